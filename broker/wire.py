"""Wire format of CLUE Edge (ARCHITECTURE.md §5): the message models and their one codec.

Every control message is a pydantic model with a versioned envelope — `v` (1), `type`
(`"kt.request"`, …), `msg_id` (uuid hex) and `sent_at` (epoch seconds) — unknown fields rejected,
strict types, every string, list and map bounded. `encode` writes msgpack (`use_bin_type`);
`decode` reads it back through a registry keyed by `type`; `decode_config` also accepts JSON,
both a full envelope and the bare shorthand `{"z": 0.3}` that `mosquitto_pub -m` sends. No pickle.

Requests (`HelpQuery`, `KtRequest`) carry `reply_to` and `corr` inside the envelope as well as in
the MQTT v5 properties, and the envelope is authoritative: a Mosquitto bridge at its default
`bridge_protocol_version mqttv311` strips every v5 property.

Decoding untrusted bytes: the size is checked first; msgpack runs with `max_*_len` bound to
`max_bytes`, `strict_map_key`, no ext types; a key given twice in a map (msgpack or JSON) is
refused; the decoded tree is walked (depth <= `MAX_DEPTH`, only plain types, string keys) before
pydantic sees it; arrays check `len(data)` against `prod(shape) * itemsize` before the data is
touched, and float arrays must be finite. Whatever the input, only `broker.errors.WireError` (or
a subclass) escapes. Which types a topic accepts, and how large, is the client's business
(`broker.topics.topic_rule`), since only it knows the topic.

>>> q = HelpQuery(node_id="n1", arch_id="mlp", lineage="base0", classes=[3], hist=[0.5, 0.5], k=2)
>>> decode(encode(q), expect=HelpQuery) == q
True
>>> decode_config(b'{"z": 0.3}').values
{'z': 0.3}
"""

from __future__ import annotations

import json
import math
import time
import uuid
from typing import Annotated, Any, ClassVar, Literal, Union

import msgpack
import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from broker import topics
from broker.errors import MessageTooLarge, SchemaError, UnknownMessageType, UnsupportedVersion, WireError
from broker.topics import TopicClass

WIRE_VERSION = 1

#: Default bound for one decoded message (the client passes its own `max_message_bytes`).
DEFAULT_MAX_BYTES = 1 << 20
#: Default bound for a config message (JSON or msgpack); the client applies it to config topics.
DEFAULT_MAX_CONFIG_BYTES = topics.MAX_CONFIG_BYTES
#: Deepest nesting accepted in a decoded message (ModelUpdate needs 5).
MAX_DEPTH = 12
#: Most containers + scalars accepted in one decoded tree.
MAX_NODES = 1 << 20
#: Array bounds.
MAX_NDIM = 8
MAX_ELEMENTS = 1 << 28
#: Largest bytes field (a KT blob, an array's data). Decoding is bounded by `max_bytes` anyway.
MAX_BLOB_BYTES = 1 << 30

# --- field types -----------------------------------------------------------------------------

#: A node id by `broker.topics.validate_node_id` (the one rule; reuse this type in settings).
NodeId = Annotated[str, StringConstraints(pattern=topics.NODE_ID_PATTERN), AfterValidator(topics.validate_node_id)]
JobId = NodeId
MsgId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
Corr = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


def _reply_topic(topic: str) -> str:
    if not topics.is_reply_topic(topic):
        raise ValueError("reply_to must be a reply topic: node/{id}/reply or relay/{id}/reply")
    return topic


#: Where a request may be answered: only a reply topic (`broker.topics.is_reply_topic`), so a
#: request cannot make its responder publish on another topic (events, meta, a batch topic).
ReplyTopic = Annotated[str, StringConstraints(max_length=200), AfterValidator(_reply_topic)]
ArchId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:/-]{1,128}$")]
Name = Annotated[str, StringConstraints(min_length=1, max_length=128)]
Key = Annotated[str, StringConstraints(min_length=1, max_length=64)]
ConfigKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_.]{0,63}$")]
Text = Annotated[str, StringConstraints(max_length=1024)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
NonNegInt = Annotated[int, Field(ge=0, le=(1 << 62))]
ClassId = Annotated[int, Field(ge=0, le=65535)]
Blob = Annotated[bytes, Field(max_length=MAX_BLOB_BYTES)]

Scalar = Union[bool, int, FiniteFloat, Text]
SmallList = Annotated[list[Scalar], Field(max_length=64)]
DetailValue = Union[Scalar, None, Annotated[list[Scalar], Field(max_length=256)]]
ConfigLeaf = Union[Scalar, None, SmallList]
ConfigValue = Union[ConfigLeaf, Annotated[dict[ConfigKey, ConfigLeaf], Field(max_length=32)]]
ConfigValues = Annotated[dict[ConfigKey, ConfigValue], Field(max_length=64)]

DType = Literal["uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64"]
ErrorCode = Literal[
    "bad_request",
    "unsupported",
    "arch_mismatch",
    "lineage_mismatch",
    "not_found",
    "no_helpers",
    "busy",
    "rejected",
    "too_large",
    "timeout",
    "internal",
]
#: Event kinds the daemons use today; `Event.kind` accepts any `[a-z][a-z0-9_.]*` name.
EVENT_KINDS: tuple[str, ...] = (
    "drift",
    "help_requested",
    "helper_installed",
    "help_done",
    "help_failed",
    "helper_discarded",
    "rejected",
    "config_applied",
    "error",
    "kt_served",
    "kt_failed",
    "help_queued",
    "config_refused",
    "train_rolled_back",
    "checkpoint_refused",
    "checkpoint_failed",
    "started",
    "stats",
    "state",
)

_FROZEN = ConfigDict(extra="forbid", frozen=True, strict=True)


# --- arrays ----------------------------------------------------------------------------------


class ArrayPayload(BaseModel):
    """A numpy array on the wire: little-endian `dtype` from a whitelist, `shape`, raw `data`.

    `len(data) == prod(shape) * itemsize` is checked before the data is looked at; float
    arrays must be finite.

    >>> a = ArrayPayload.from_numpy(np.arange(6, dtype=np.float32).reshape(2, 3))
    >>> a.to_numpy().shape, a.dtype
    ((2, 3), 'float32')
    """

    model_config = _FROZEN

    dtype: DType
    shape: Annotated[list[Annotated[int, Field(ge=0, le=MAX_ELEMENTS)]], Field(max_length=MAX_NDIM)]
    data: Blob

    @model_validator(mode="after")
    def _check(self) -> "ArrayPayload":
        count = 1
        for dim in self.shape:
            count *= dim
            if count > MAX_ELEMENTS:
                raise ValueError(f"array has more than {MAX_ELEMENTS} elements")
        itemsize = np.dtype(self.dtype).itemsize
        if len(self.data) != count * itemsize:
            raise ValueError(
                f"array data is {len(self.data)} bytes, shape {self.shape} of {self.dtype} needs {count * itemsize}"
            )
        if self.dtype.startswith("float") and count:
            if not np.isfinite(np.frombuffer(self.data, dtype=_np_dtype(self.dtype))).all():
                raise ValueError("float array contains NaN or infinity")
        return self

    def to_numpy(self) -> np.ndarray:
        """A read-only view of the data with its dtype (native values, little-endian layout) and shape."""
        return np.frombuffer(self.data, dtype=_np_dtype(self.dtype)).reshape(self.shape)

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> "ArrayPayload":
        """Wrap an array (any byte order, any strides) of a whitelisted dtype."""
        arr = np.asarray(array)
        name = arr.dtype.name
        if name not in _DTYPES:
            raise WireError(f"dtype {arr.dtype} is not one of {sorted(_DTYPES)}")
        # ascontiguousarray makes 0-d arrays 1-d; the shape sent must stay the array's own.
        shape = list(arr.shape)
        arr = np.ascontiguousarray(arr, dtype=_np_dtype(name))
        try:
            return cls(dtype=name, shape=shape, data=arr.tobytes())
        except ValidationError as exc:
            raise SchemaError(_summary(exc)) from exc

    @property
    def ndim(self) -> int:
        return len(self.shape)


_DTYPES = frozenset(("uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64"))


def _np_dtype(name: str) -> np.dtype:
    return np.dtype(name).newbyteorder("<")


class NamedArray(BaseModel):
    """One named tensor (FedAvg baseline)."""

    model_config = _FROZEN

    name: Name
    array: ArrayPayload


class Candidate(BaseModel):
    """One helper candidate returned by the MdS, with its similarity score."""

    model_config = _FROZEN

    node_id: NodeId
    score: FiniteFloat
    #: The requested classes this node holds; with `cover="all"` that is every one of them.
    classes: Annotated[list[ClassId], Field(max_length=4096)] = Field(default_factory=list)


# --- envelope and registry -------------------------------------------------------------------

_REGISTRY: dict[str, type["Envelope"]] = {}
#: A tuple of message classes (an alias: inside a model body `type` is the field name).
MessageClasses = tuple[type["Envelope"], ...]


class Envelope(BaseModel):
    """Base of every control message: `v`, `type`, `msg_id`, `sent_at`.

    Subclasses set `type` to a `Literal` default and are registered under it, which is how
    `decode` dispatches. Class attributes: `byte_class` (the byte-accounting class of the
    message, overriding its topic's), `is_request` (carries `reply_to`/`corr`), `is_reply`
    (matched to a pending request by `corr`), `reply_types` (what a request may be answered with).
    """

    model_config = _FROZEN

    byte_class: ClassVar[TopicClass | None] = None
    is_request: ClassVar[bool] = False
    is_reply: ClassVar[bool] = False
    reply_types: ClassVar[MessageClasses] = ()

    v: Literal[1] = 1
    type: str
    msg_id: MsgId = Field(default_factory=lambda: uuid.uuid4().hex)
    sent_at: FiniteFloat = Field(default_factory=time.time)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        field = cls.model_fields.get("type")
        name = field.default if field is not None else None
        if not isinstance(name, str):
            return  # an abstract intermediate class
        other = _REGISTRY.get(name)
        if other is not None and other.__qualname__ != cls.__qualname__:
            raise TypeError(f"message type {name!r} registered twice ({other.__qualname__}, {cls.__qualname__})")
        _REGISTRY[name] = cls

    def evolve(self, **changes: Any) -> "Envelope":
        """A validated copy with `changes` applied (models are frozen)."""
        try:
            return type(self).model_validate({**self.model_dump(), **changes})
        except ValidationError as exc:
            raise SchemaError(_summary(exc)) from exc


def message_types() -> dict[str, type[Envelope]]:
    """The registry: `type` string -> model class."""
    return dict(_REGISTRY)


# --- messages --------------------------------------------------------------------------------


#: Largest top-k an application may ask for per sample.
MAX_TOP_K = 4096


def _int_vector(array: ArrayPayload, what: str) -> None:
    if not array.dtype.startswith(("int", "uint")) or array.ndim != 1:
        raise ValueError(f"{what} must be a 1-d integer array")


class RequestBatch(Envelope):
    """One request batch for a node: inputs `x` (first axis = samples), optional integer labels `y`.

    Labels may also come later, on the node's labels topic (`Labels`), by `batch_id`. With
    `reply_to` (an application's reply topic) and `corr` the prediction is also sent there,
    correlated; `top_k` asks for the k most probable classes of every sample with their
    probabilities (None: the node's `top_k` setting).
    """

    byte_class: ClassVar[TopicClass | None] = "batch"
    is_request: ClassVar[bool] = True
    #: Array fields and their dtypes when the message comes as JSON (nested lists).
    json_arrays: ClassVar[dict[str, str]] = {"x": "float32", "y": "int64", "y_indices": "int64"}
    type: Literal["batch"] = "batch"
    batch_id: NonNegInt
    x: ArrayPayload
    y: ArrayPayload | None = None
    #: The samples `y` labels when it labels only some (the others may be labelled later).
    y_indices: ArrayPayload | None = None
    meta: Annotated[dict[Key, Scalar], Field(max_length=32)] = Field(default_factory=dict)
    reply_to: ReplyTopic | None = None
    corr: Corr | None = None
    top_k: Annotated[int, Field(ge=0, le=MAX_TOP_K)] | None = None

    @model_validator(mode="after")
    def _check(self) -> "RequestBatch":
        if self.x.ndim < 1:
            raise ValueError("x must have a sample axis")
        if self.y_indices is not None:
            if self.y is None:
                raise ValueError("y_indices without y")
            _int_vector(self.y_indices, "y_indices")
            if self.y_indices.shape[0] != self.y.shape[0]:
                raise ValueError(f"y has {self.y.shape[0]} labels for {self.y_indices.shape[0]} indices")
        if self.y is not None:
            _int_vector(self.y, "y")
            if self.y_indices is None and self.y.shape[0] != self.x.shape[0]:
                raise ValueError(f"y has {self.y.shape[0]} labels for {self.x.shape[0]} samples")
        return self


class Prediction(Envelope):
    """Predicted classes for one batch, the helpers used, and the errors if labels were given.

    `model_version` counts the serving node's training steps (and models it adopted) since it
    started; `top_classes` / `top_probs` (N, k) hold each sample's k most probable classes, most
    probable first, when asked for. `corr` is the request's, on an application's reply topic.
    """

    byte_class: ClassVar[TopicClass | None] = "prediction"
    is_reply: ClassVar[bool] = True
    json_arrays: ClassVar[dict[str, str]] = {"y_hat": "int64", "top_classes": "int64", "top_probs": "float32"}
    type: Literal["prediction"] = "prediction"
    batch_id: NonNegInt
    y_hat: ArrayPayload
    helpers: Annotated[list[NodeId], Field(max_length=64)] = Field(default_factory=list)
    error: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None = None
    target_error: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None = None
    model_version: NonNegInt | None = None
    top_classes: ArrayPayload | None = None
    top_probs: ArrayPayload | None = None
    corr: Corr | None = None

    @model_validator(mode="after")
    def _check(self) -> "Prediction":
        if self.y_hat.dtype != "int64" or self.y_hat.ndim != 1:
            raise ValueError("y_hat must be a 1-d int64 array")
        if (self.top_classes is None) != (self.top_probs is None):
            raise ValueError("top_classes and top_probs come together")
        if self.top_classes is not None and self.top_probs is not None:
            n = self.y_hat.shape[0]
            if self.top_classes.ndim != 2 or self.top_classes.shape[0] != n or self.top_classes.dtype != "int64":
                raise ValueError("top_classes must be an (N, k) int64 array")
            if self.top_probs.shape != self.top_classes.shape or not self.top_probs.dtype.startswith("float"):
                raise ValueError("top_probs must be a float array shaped like top_classes")
        return self


class Labels(Envelope):
    """Labels that come after their batch: `y` for every sample of batch `batch_id`, in order, or
    for the samples `indices` names (any order, each at most once over all messages).

    With `reply_to` and `corr` the node answers with `LabelsAck` (or an `ErrorReply`).
    """

    byte_class: ClassVar[TopicClass | None] = "labels"
    is_request: ClassVar[bool] = True
    json_arrays: ClassVar[dict[str, str]] = {"y": "int64", "indices": "int64"}
    type: Literal["labels"] = "labels"
    batch_id: NonNegInt
    y: ArrayPayload
    indices: ArrayPayload | None = None
    reply_to: ReplyTopic | None = None
    corr: Corr | None = None

    @model_validator(mode="after")
    def _check(self) -> "Labels":
        _int_vector(self.y, "y")
        if self.y.shape[0] == 0:
            raise ValueError("y holds no label")
        if self.indices is not None:
            _int_vector(self.indices, "indices")
            if self.indices.shape[0] != self.y.shape[0]:
                raise ValueError(f"{self.y.shape[0]} labels for {self.indices.shape[0]} indices")
        return self


class LabelsAck(Envelope):
    """A node took a `Labels` message: how many samples it learnt from and their served error."""

    byte_class: ClassVar[TopicClass | None] = "labels"
    is_reply: ClassVar[bool] = True
    type: Literal["labels.ack"] = "labels.ack"
    batch_id: NonNegInt
    learnt: NonNegInt
    #: Served error on the labelled samples (None when the training step was rolled back).
    error: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None = None
    #: Samples of the batch still unlabelled.
    pending: NonNegInt = 0
    corr: Corr | None = None


class NodeMeta(Envelope):
    """What the MdS knows about a node: architecture, lineage, class histogram, rolling error."""

    byte_class: ClassVar[TopicClass | None] = "meta"
    type: Literal["meta"] = "meta"
    node_id: NodeId
    arch_id: ArchId
    lineage: ArchId
    hist: Annotated[list[Annotated[float, Field(ge=0.0, allow_inf_nan=False)]], Field(max_length=4096)]
    rolling_error: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] | None = None
    batches: NonNegInt = 0
    helpers: NonNegInt = 0
    ts: FiniteFloat = Field(default_factory=time.time)


class Event(Envelope):
    """Something that happened on a node (see `EVENT_KINDS`), with a small flat `detail` map."""

    byte_class: ClassVar[TopicClass | None] = "events"
    type: Literal["event"] = "event"
    node_id: NodeId
    kind: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_.]{0,63}$")]
    detail: Annotated[dict[Key, DetailValue], Field(max_length=64)] = Field(default_factory=dict)


class ConfigPatch(Envelope):
    """Config changes: `{"z": 0.3, "drift.threshold": 0.4}`; values are JSON scalars, small lists
    or one level of small maps. Validated against the agent's config by the agent, not here."""

    byte_class: ClassVar[TopicClass | None] = "config"
    type: Literal["config.patch"] = "config.patch"
    values: ConfigValues


class ConfigAck(Envelope):
    """The answer to a config patch: what was applied, or why it was refused."""

    byte_class: ClassVar[TopicClass | None] = "config"
    type: Literal["config.ack"] = "config.ack"
    node_id: NodeId
    ok: bool
    applied: ConfigValues | None = None
    error: Text | None = None
    patch_id: MsgId | None = None


class ConfigRequest(Envelope):
    """An operator asks a node for its current configuration (``clue-ctl config NODE``), on the
    node's config topic; the node answers with a `ConfigState` on its config/ack topic, naming this
    message's `msg_id` as `request_id` (the ack topic is the one the operator's ACL already reads)."""

    byte_class: ClassVar[TopicClass | None] = "config"
    type: Literal["config.request"] = "config.request"


class ConfigState(Envelope):
    """A node's configuration now, answering a `ConfigRequest`.

    `values`: the run-time knobs, as a `ConfigAck` gives them; `patched`: the knobs set by run-time
    patches (stored beside the checkpoint); `settings`: what the daemon started with (files, the
    broker URL, the metrics endpoint), never a password.
    """

    byte_class: ClassVar[TopicClass | None] = "config"
    type: Literal["config.state"] = "config.state"
    node_id: NodeId
    request_id: MsgId
    values: ConfigValues
    patched: Annotated[list[ConfigKey], Field(max_length=64)] = Field(default_factory=list)
    settings: ConfigValues = Field(default_factory=dict)


class ErrorReply(Envelope):
    """A typed failure answer to a request (never silence)."""

    is_reply: ClassVar[bool] = True
    type: Literal["error"] = "error"
    corr: Corr | None = None
    code: ErrorCode
    message: Text = ""


# Answered with messages defined after them.
RequestBatch.reply_types = (Prediction, ErrorReply)
Labels.reply_types = (LabelsAck, ErrorReply)


class HelperList(Envelope):
    """The MdS's answer: the top-k candidates, best first."""

    byte_class: ClassVar[TopicClass | None] = "query"
    is_reply: ClassVar[bool] = True
    type: Literal["mds.reply"] = "mds.reply"
    corr: Corr
    candidates: Annotated[list[Candidate], Field(max_length=64)] = Field(default_factory=list)


class KtBlob(Envelope):
    """A helper's significant parameters (the KT blob of ARCHITECTURE.md §5, opaque here)."""

    byte_class: ClassVar[TopicClass | None] = "kt"
    is_reply: ClassVar[bool] = True
    type: Literal["kt.blob"] = "kt.blob"
    corr: Corr
    blob: Blob
    helper: NodeId | None = None
    count: NonNegInt = 0


class HelpQuery(Envelope):
    """A node asks the MdS for up to `k` helpers for `classes`."""

    byte_class: ClassVar[TopicClass | None] = "query"
    is_request: ClassVar[bool] = True
    reply_types: ClassVar[MessageClasses] = (HelperList, ErrorReply)
    type: Literal["mds.query"] = "mds.query"
    node_id: NodeId
    arch_id: ArchId
    lineage: ArchId
    classes: Annotated[list[ClassId], Field(max_length=4096)]
    hist: Annotated[list[Annotated[float, Field(ge=0.0, allow_inf_nan=False)]], Field(max_length=4096)]
    k: Annotated[int, Field(ge=1, le=64)] = 1
    #: Which nodes qualify: holding every requested class, at least one of them (ranked by how
    #: many they hold, then by similarity; for pooling helpers that each know part of the new
    #: classes), or any node (the paper's deliberately wrong first helper, Fig. 10).
    cover: Literal["all", "any", "none"] = "all"
    rank: Literal["most_similar", "least_similar"] = "most_similar"
    reply_to: ReplyTopic | None = None
    corr: Corr | None = None


class KtRequest(Envelope):
    """A target asks a helper (or the relay, which picks one) for significant parameters."""

    byte_class: ClassVar[TopicClass | None] = "kt"
    is_request: ClassVar[bool] = True
    reply_types: ClassVar[MessageClasses] = (KtBlob, ErrorReply)
    type: Literal["kt.request"] = "kt.request"
    classes: Annotated[list[ClassId], Field(min_length=1, max_length=4096)]
    z: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
    arch_id: ArchId
    lineage: ArchId
    value_codec: Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]{1,32}$")] = "float16"
    reply_to: ReplyTopic | None = None
    corr: Corr | None = None
    target: NodeId | None = None


class _ModelTensors(Envelope):
    """What both FedAvg messages carry: a job's round, named tensors (unique names), sample weight."""

    byte_class: ClassVar[TopicClass | None] = "fl"
    type: str
    job: JobId
    round: NonNegInt
    tensors: Annotated[list[NamedArray], Field(max_length=4096)]
    samples: NonNegInt

    @model_validator(mode="after")
    def _check(self) -> "_ModelTensors":
        _unique_names(self.tensors)
        return self


class ModelUpdate(_ModelTensors):
    """FedAvg baseline: one node's model after local training."""

    type: Literal["fl.update"] = "fl.update"
    node_id: NodeId


class GlobalModel(_ModelTensors):
    """FedAvg baseline: the averaged model of a round."""

    type: Literal["fl.global"] = "fl.global"


class BlobChunk(Envelope):
    """One piece of a payload above the chunk size (see `broker.chunking`).

    `digest` is the sha256 of the whole payload; `cls` the byte class the sender counted it under,
    so the receiver counts it the same way before it knows what the payload is.
    """

    type: Literal["chunk"] = "chunk"
    transfer: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
    index: Annotated[int, Field(ge=0, lt=1 << 16)]
    count: Annotated[int, Field(ge=1, le=1 << 16)]
    total: Annotated[int, Field(ge=0, le=MAX_BLOB_BYTES)]
    digest: Annotated[bytes, Field(min_length=32, max_length=32)]
    cls: TopicClass = "other"
    data: Blob

    @model_validator(mode="after")
    def _check(self) -> "BlobChunk":
        if self.index >= self.count:
            raise ValueError(f"chunk index {self.index} >= count {self.count}")
        if len(self.data) > self.total:
            raise ValueError("chunk longer than the whole payload")
        return self


def _unique_names(tensors: list[NamedArray]) -> None:
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor names")


#: Request type -> reply types, for documentation and the client's checks.
REQUEST_TYPES: tuple[type[Envelope], ...] = (HelpQuery, KtRequest)
REPLY_TYPES: tuple[type[Envelope], ...] = (HelperList, KtBlob, ErrorReply)


# --- codec -----------------------------------------------------------------------------------


def encode(msg: Envelope) -> bytes:
    """msgpack bytes of an envelope (bin type for bytes, str for text)."""
    if not isinstance(msg, Envelope):
        raise WireError(f"cannot encode {type(msg).__name__}: not an Envelope")
    try:
        return msgpack.packb(msg.model_dump(mode="python"), use_bin_type=True)
    except Exception as exc:  # a model built with model_construct may hold anything
        raise WireError(f"cannot encode {type(msg).__name__}: {exc}") from exc


def encode_json(msg: Envelope) -> bytes:
    """JSON bytes of an envelope without bytes fields (config topics: `ConfigPatch`, `ConfigAck`)."""
    if not isinstance(msg, Envelope):
        raise WireError(f"cannot encode {type(msg).__name__}: not an Envelope")
    try:
        return json.dumps(msg.model_dump(mode="python"), allow_nan=False, separators=(",", ":")).encode()
    except Exception as exc:
        raise WireError(f"cannot encode {type(msg).__name__} as JSON: {exc}") from exc


ExpectArg = Union[type[Envelope], tuple[type[Envelope], ...], None]


def decode(data: bytes, *, expect: ExpectArg = None, max_bytes: int = DEFAULT_MAX_BYTES) -> Envelope:
    """Decode msgpack bytes into the registered model named by their `type`.

    `expect` restricts the accepted types (a class or a tuple; subclasses count). Raises only
    `WireError` subclasses: `MessageTooLarge`, `UnsupportedVersion`, `UnknownMessageType`,
    `SchemaError`, or `WireError` itself for bytes that are not msgpack.
    """
    raw = _as_bytes(data)
    if len(raw) > max_bytes:
        raise MessageTooLarge(f"message of {len(raw)} bytes exceeds {max_bytes}")
    return from_obj(_unpack(raw, max_bytes), expect=expect)


def decode_config(
    data: bytes, *, expect: ExpectArg = ConfigPatch, max_bytes: int = DEFAULT_MAX_CONFIG_BYTES
) -> Envelope:
    """Decode a config-topic payload: a msgpack envelope, a JSON envelope, or bare JSON.

    Bytes starting with `{` (after whitespace) are JSON, anything else msgpack. A JSON object with
    both `v` and `type` keys is an envelope; any other JSON object is shorthand for
    `ConfigPatch(values=obj)`. NaN, infinities and a key given twice (at any depth) are refused.

    >>> decode_config(b'{"z": 0.3, "operator": "mean"}').values
    {'z': 0.3, 'operator': 'mean'}
    """
    raw = _as_bytes(data)
    if len(raw) > max_bytes:
        raise MessageTooLarge(f"config message of {len(raw)} bytes exceeds {max_bytes}")
    if not raw.lstrip(b" \t\r\n").startswith(b"{"):
        # `mosquitto_pub -m 'z=0.3'` is valid msgpack up to its first byte: say what was expected.
        neither = f"config message is neither JSON (an object) nor msgpack: {raw[:40]!r}"
        try:
            obj = _unpack(raw, max_bytes)
        except SchemaError:
            raise
        except WireError as exc:
            raise WireError(neither) from exc
        if not isinstance(obj, dict):
            raise WireError(neither)
        return from_obj(obj, expect=expect)
    obj = _json_object(raw, "config message")
    if "v" in obj and "type" in obj:
        return from_obj(obj, expect=expect)
    if not _expects(ConfigPatch, expect):
        raise UnknownMessageType("bare JSON is shorthand for config.patch, which is not expected here")
    return from_obj({"v": WIRE_VERSION, "type": ConfigPatch.model_fields["type"].default, "values": obj}, expect=expect)


def _json_object(raw: bytes, noun: str) -> dict[str, Any]:
    """A JSON object from ``raw``: no NaN or infinity, no key twice at any depth; ``noun`` names it in errors."""
    try:
        obj = json.loads(
            raw.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite_float, object_pairs_hook=_unique_map
        )
    except _DuplicateKey as exc:
        raise SchemaError(f"duplicate key {exc.key[:64]!r} in the {noun}") from exc
    except Exception as exc:  # JSONDecodeError, UnicodeDecodeError, RecursionError, …
        raise WireError(f"not a JSON {noun}: {type(exc).__name__}: {str(exc)[:200]}") from exc
    if not isinstance(obj, dict):
        raise SchemaError(f"a JSON {noun} must be an object")
    return obj


def is_json(data: bytes) -> bool:
    """True for a payload that is a JSON object (its first non-blank byte is `{`; msgpack maps never start so)."""
    return _as_bytes(data).lstrip(b" \t\r\n").startswith(b"{")


def decode_app(data: bytes, *, bare_type: str, max_bytes: int = DEFAULT_MAX_BYTES) -> Envelope:
    """Decode what an application sends (a request batch, labels): msgpack, or JSON with arrays as nested lists.

    A JSON object with `v` and `type` is an envelope; any other is the bare fields of `bare_type`
    (the topic's message), e.g. `{"batch_id": 7, "x": [[0.1, 0.2]]}` on a batch topic. A model's
    `json_arrays` names its array fields and their dtype: a nested list of numbers, rectangular,
    at most `MAX_NDIM` deep, becomes that array (integers must be whole numbers in range). The
    size limit applies before parsing, and the message's other checks as for msgpack.

    >>> decode_app(b'{"batch_id": 3, "y": [1, 0]}', bare_type="labels").y.to_numpy().tolist()
    [1, 0]
    """
    raw = _as_bytes(data)
    if len(raw) > max_bytes:
        raise MessageTooLarge(f"message of {len(raw)} bytes exceeds {max_bytes}")
    if not is_json(raw):
        return decode(raw, max_bytes=max_bytes)
    obj = _json_object(raw, "message")
    if "v" not in obj and "type" not in obj:
        obj = {"v": WIRE_VERSION, "type": bare_type, **obj}
    name = obj.get("type")
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    for name, dtype in (getattr(cls, "json_arrays", None) or {}).items():
        if isinstance(obj.get(name), list):
            obj[name] = _json_array(obj[name], name, dtype).model_dump()
    return from_obj(obj, expect=cls)


def _json_array(value: list, name: str, dtype: str) -> ArrayPayload:
    depth = 0
    probe: Any = value
    while isinstance(probe, list):
        depth += 1
        if depth > MAX_NDIM:
            raise SchemaError(f"{name}: nested deeper than {MAX_NDIM} levels")
        probe = probe[0] if probe else 0
    _check_tree(value)
    stack = [value]
    while stack:
        item = stack.pop()
        for v in item:
            if isinstance(v, list):
                stack.append(v)
            elif isinstance(v, bool) or not isinstance(v, (int, float)):
                raise SchemaError(f"{name}: holds a {type(v).__name__}, not a number")
    try:
        loose = np.array(value, dtype=np.float64)
    except (ValueError, TypeError, OverflowError) as exc:
        raise SchemaError(f"{name}: not a rectangular array of numbers ({str(exc)[:120]})") from exc
    if dtype.startswith(("int", "uint")):
        info = np.iinfo(dtype)
        if loose.size and (not np.all(loose == np.round(loose)) or loose.min() < info.min or loose.max() > info.max):
            raise SchemaError(f"{name}: must hold whole numbers in [{info.min}, {info.max}]")
    if not np.isfinite(loose).all():
        raise SchemaError(f"{name}: holds a non-finite number")
    if dtype.startswith("float") and loose.size and np.abs(loose).max() > np.finfo(dtype).max:
        raise SchemaError(f"{name}: holds a number beyond {dtype}'s range")
    return ArrayPayload.from_numpy(loose.astype(dtype))


def encode_app_json(msg: Envelope) -> bytes:
    """JSON of a message an application reads (a prediction, an acknowledgement), arrays as nested lists."""
    if not isinstance(msg, Envelope):
        raise WireError(f"cannot encode {type(msg).__name__}: not an Envelope")
    obj = msg.model_dump(mode="python")
    for name in getattr(msg, "json_arrays", None) or {}:
        array = getattr(msg, name, None)
        if isinstance(array, ArrayPayload):
            obj[name] = array.to_numpy().tolist()
    try:
        return json.dumps(obj, allow_nan=False, separators=(",", ":")).encode()
    except Exception as exc:
        raise WireError(f"cannot encode {type(msg).__name__} as JSON: {exc}") from exc


def from_obj(obj: Any, *, expect: ExpectArg = None) -> Envelope:
    """Validate an already-parsed tree (dicts, lists, scalars, bytes) as a registered message."""
    _check_tree(obj)
    if not isinstance(obj, dict):
        raise SchemaError(f"a message must be a map, got {type(obj).__name__}")
    version = obj.get("v")
    if type(version) is not int or version != WIRE_VERSION:
        raise UnsupportedVersion(f"unsupported wire version {str(version)[:20]!r} (this code speaks {WIRE_VERSION})")
    name = obj.get("type")
    if not isinstance(name, str):
        raise SchemaError("message has no string 'type'")
    cls = _REGISTRY.get(name)
    if cls is None:
        raise UnknownMessageType(f"unknown message type {name[:64]!r}")
    if not _expects(cls, expect):
        raise UnknownMessageType(f"got {name!r}, expected {_names(expect)}")
    try:
        return cls.model_validate(obj)
    except ValidationError as exc:
        raise SchemaError(f"invalid {name!r}: {_summary(exc)}") from exc
    except Exception as exc:  # a validator tripping on odd input is still bad input
        raise SchemaError(f"invalid {name!r}: {type(exc).__name__}: {str(exc)[:200]}") from exc


def _unpack(raw: bytes, max_bytes: int) -> Any:
    """msgpack bytes -> plain tree, bounded, one value, no ext types, no key twice in a map."""
    try:
        return msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            use_list=True,
            timestamp=0,
            max_bin_len=max_bytes,
            max_str_len=max_bytes,
            max_array_len=max_bytes,
            max_map_len=max_bytes,
            max_ext_len=0,
            object_pairs_hook=_unique_map,
        )
    except _DuplicateKey as exc:
        raise SchemaError(f"duplicate key {str(exc.key)[:64]!r} in a map") from exc
    except Exception as exc:  # msgpack raises many ValueError/TypeError flavours
        raise WireError(f"not a msgpack message: {_reason(exc)}") from exc


class _DuplicateKey(Exception):
    def __init__(self, key: Any) -> None:
        super().__init__(key)
        self.key = key


def _unique_map(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """A map from its pairs, refusing a key given twice: readers disagree on which value wins
    (Python keeps the last), so a duplicate could mean one thing here and another elsewhere."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[Any] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return out


def _as_bytes(data: Any) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise WireError(f"expected bytes, got {type(data).__name__}")


_MIN_INT = -(1 << 63)
_MAX_UINT = (1 << 64) - 1


def _check_tree(obj: Any) -> None:
    """Depth, node count and plain types only, before pydantic sees anything."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    nodes = 0
    while stack:
        item, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise SchemaError(f"message has more than {MAX_NODES} values")
        if isinstance(item, dict):
            if depth > MAX_DEPTH:
                raise SchemaError(f"message nested deeper than {MAX_DEPTH}")
            for key, value in item.items():
                if type(key) is not str:
                    raise SchemaError("map keys must be strings")
                stack.append((value, depth + 1))
        elif isinstance(item, list):
            if depth > MAX_DEPTH:
                raise SchemaError(f"message nested deeper than {MAX_DEPTH}")
            stack.extend((value, depth + 1) for value in item)
        elif type(item) is int:
            # JSON has no integer limit; msgpack (and so every re-encode, ack or relay) does.
            if not _MIN_INT <= item <= _MAX_UINT:
                raise SchemaError("integer out of the 64-bit range")
        elif item is None or type(item) in (str, bytes, float, bool):
            continue
        else:
            raise SchemaError(f"unsupported value of type {type(item).__name__}")


def _expects(cls: type[Envelope], expect: ExpectArg) -> bool:
    if expect is None:
        return True
    kinds = expect if isinstance(expect, tuple) else (expect,)
    return issubclass(cls, kinds)


def _names(expect: ExpectArg) -> str:
    kinds = expect if isinstance(expect, tuple) else (expect,)
    return ", ".join(repr(k.model_fields["type"].default) for k in kinds if k is not None)


def _reason(exc: BaseException) -> str:
    """An exception as a reason: its type, and its message when it has one (msgpack's often do not)."""
    text = str(exc)[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is not a finite number")
    return value


def _summary(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False, include_input=False)[:3]:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{loc or '<root>'}: {err.get('msg', '')}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


__all__ = [
    "ArrayPayload",
    "BlobChunk",
    "Candidate",
    "ConfigAck",
    "ConfigPatch",
    "ConfigRequest",
    "ConfigState",
    "DEFAULT_MAX_BYTES",
    "EVENT_KINDS",
    "Envelope",
    "ErrorReply",
    "Event",
    "GlobalModel",
    "HelpQuery",
    "HelperList",
    "KtBlob",
    "KtRequest",
    "ModelUpdate",
    "NamedArray",
    "NodeMeta",
    "Prediction",
    "REPLY_TYPES",
    "REQUEST_TYPES",
    "RequestBatch",
    "WIRE_VERSION",
    "decode",
    "decode_config",
    "encode",
    "encode_json",
    "from_obj",
    "message_types",
]
