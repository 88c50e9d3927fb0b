"""The agent daemon's settings: a TOML file, then ``CLUE_*`` environment variables, then flags.

Everything has a default except the node id. Secrets (the MQTT password, the TLS key password)
are never settings values: settings name *files*, and a relative name is looked up in systemd's
``$CREDENTIALS_DIRECTORY`` (``LoadCredential=``) first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import SettingsConfigDict
from torch import nn

from agent.config import LearnerConfig, patched
from agent.errors import ConfigError
from agent.fl import FlConfig
from agent.models import (
    ARCHITECTURES,
    InputShape,
    ModelArgs,
    ModelError,
    ModelSpec,
    TrainablePrefixes,
    build_from_spec,
    check_input_shape,
    check_model_name,
    load_weights,
)
from broker import topics
from service.metrics import MetricsSettings
from service.settings import BrokerSettings, LayeredSettings, problems


class DaemonKnobs(BaseModel):
    """The daemon-level knobs an operator may change at run time (besides the learner's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kt_mode: Literal["direct", "relay"] = Field("direct", description="KT straight to the helper's topic, or through the trusted relay")
    kt_timeout: float = Field(10.0, ge=0.1, le=600.0, description="seconds to wait for one KT answer before the next candidate")
    mds_timeout: float = Field(5.0, ge=0.1, le=600.0, description="seconds to wait for the MdS")
    meta_interval: float = Field(1.0, ge=0.0, le=3600.0, description="least seconds between two metadata publications")
    meta_min_change: float = Field(
        0.02, ge=0.0, le=1.0,
        description="how far the class shares must have moved (total variation) since the last publication before the metadata goes out again; a change in the helper pool always goes out (0: after every batch)",
    )
    meta_heartbeat: float = Field(
        300.0, ge=0.0, le=86_400.0,
        description="seconds after which the metadata goes out even if unchanged, so the MdS's rolling error and batch count stay fresh",
    )
    checkpoint_every: int = Field(50, ge=1, le=1_000_000, description="batches between checkpoints")
    served_max_batches: int = Field(
        256, ge=0, le=1_000_000,
        description="unlabelled served batches kept for labels that come later (0: late labels are refused); the oldest expires first",
    )
    served_max_mb: float = Field(
        32.0, ge=0.0, le=65_536.0,
        description="MiB those batches may take (inputs and every pooled model's predictions); the oldest expires first",
    )
    top_k: int = Field(0, ge=0, le=4096, description="send each sample's k most probable classes with their probabilities (0: off; a batch may ask for its own)")


class AgentSettings(LayeredSettings, BrokerSettings, MetricsSettings):
    """``clue-agent`` settings. Nested fields use ``__`` in environment names: ``CLUE_LEARNER__Z=0.3``."""

    # env_prefix_target="all": the aliases of `model` are read as CLUE_MODEL and CLUE_ARCH, never as a bare MODEL or ARCH.
    model_config = SettingsConfigDict(env_prefix="CLUE_", env_prefix_target="all", env_nested_delimiter="__", extra="forbid", frozen=True)

    node_id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="this node's id (topics, client id, TLS identity)")
    state_dir: Path = Field(Path("state"), description="where checkpoints live (systemd: StateDirectory=)")
    model: str = Field(
        "mlp4", validation_alias=AliasChoices("model", "arch"),
        description=f"the classifier: a built-in ({', '.join(sorted(ARCHITECTURES))}) or an import path package.module:factory (the old key arch is read too)",
    )
    model_args: ModelArgs = Field(
        default_factory=dict, description="keyword arguments of the model's factory besides num_classes (strings, numbers, booleans, lists of them)",
    )
    input_shape: InputShape | None = Field(
        None, validate_default=True,
        description="one sample's shape, such as [784] or [3, 32, 32]; batches of another are refused (required for an import-path model; absent for a built-in: its own, unchecked)",
    )
    trainable: TrainablePrefixes | None = Field(
        None,
        description="prefixes of the parameter names this node trains, such as ['head.'] (each must match one); the others keep the base weights and never travel; the same on every node of a fleet; absent: every parameter",
    )
    num_classes: int = Field(10, ge=2, le=4096, description="classes the model outputs")
    backbone: str | None = Field(
        None, description="split serving: the submodule holding the frozen backbone, such as 'backbone' (with head; docs/bring-your-own.md)",
    )
    head: str | None = Field(None, description="split serving: the submodule holding the trainable head, such as 'head'; the learner trains, transfers and averages it alone")
    backbone_runtime: Literal["torch", "onnxruntime", "litert"] = Field(
        "torch", description="engine running the frozen backbone: torch (on device), onnxruntime (onnx_providers) or litert (litert_delegate)",
    )
    backbone_model: Path | None = Field(None, description="the exported backbone (.onnx or .tflite from clue-agent-export, its .json beside it) for onnxruntime and litert")
    litert_delegate: str | None = Field(None, description="LiteRT delegate library, such as libedgetpu.so.1 for a Coral Edge TPU; absent: the CPU")

    base_weights: Path | None = Field(None, description="the fleet's shared base weights (.safetensors or .npz); absent: built from model_seed")
    model_seed: int = Field(0, ge=0, description="seed of the base weights when no file is given (same seed, same lineage)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the model runs")
    runtime: Literal["torch", "onnx"] = Field("torch", description="engine serving the frozen helpers (the target, retrained every batch, stays on torch: an export per batch costs more than it saves)")
    onnx_providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"], description="onnxruntime execution providers, in order")
    torch_threads: int = Field(1, ge=1, le=256, description="torch intra-op threads (set explicitly: several agents share a box)")
    malloc_retain_mb: int = Field(
        64, ge=0, le=2047,
        description="glibc: freed memory kept for reuse, so each batch's tensors are not page-faulted back (0: glibc's adaptive default)",
    )
    max_batch_bytes: int = Field(16 << 20, ge=1024, le=1 << 30, description="largest request batch accepted")
    reply_cache_mb: int = Field(
        16, ge=0, le=4096,
        description="KT replies kept to answer a retried request without recomputing it (75 KB a blob for mlp4 at z = 0.5 with int4_delta, 0.46 MB with float16; 0: none)",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")
    daemon: DaemonKnobs = Field(default_factory=DaemonKnobs, description="run-time knobs of the daemon")
    learner: LearnerConfig = Field(default_factory=LearnerConfig, description="the learner's knobs (ARCHITECTURE §6)")
    fl: FlConfig | None = Field(None, description="take part in a FedAvg job (the simulator's baseline); absent: no FedAvg")

    @field_validator("node_id")
    @classmethod
    def _usable_in_topics(cls, value: str) -> str:
        # The bus owns the rule (".." and "." pass the character class but are not topic levels).
        if not topics.is_valid_node_id(value):
            raise ValueError(f"node id {value!r} cannot name MQTT topics: use 1-64 of A-Z a-z 0-9 _ . - other than '.' and '..'")
        return value

    # Only what needs no import: the daemon builds the model at start and exits 78 if it fails.
    @field_validator("model")
    @classmethod
    def _built_in_or_import_path(cls, value: str) -> str:
        check_model_name(value)
        return value

    @field_validator("input_shape")
    @classmethod
    def _shape_known(cls, value: tuple[int, ...] | None, info: ValidationInfo) -> tuple[int, ...] | None:
        if "model" in info.data:  # else the model is refused already
            check_input_shape(info.data["model"], value)
        return value

    @model_validator(mode="after")
    def _split_serving(self) -> "AgentSettings":
        if (self.backbone is None) != (self.head is None):
            raise ValueError("backbone and head name the model's two submodules for split serving: set both or neither")
        if self.backbone is None and (self.backbone_runtime != "torch" or self.backbone_model is not None or self.litert_delegate is not None):
            raise ValueError("backbone_runtime, backbone_model and litert_delegate need split serving: set backbone and head")
        if self.backbone is not None and self.trainable is None:
            raise ValueError(f"trainable: split serving trains the head only: set trainable to its prefix, such as [{self.head + '.'!r}]")
        if self.backbone_runtime != "torch" and self.backbone_model is None:
            raise ValueError(f"backbone_model: backbone_runtime = {self.backbone_runtime!r} needs the exported backbone's file (clue-agent-export)")
        if self.litert_delegate is not None and self.backbone_runtime != "litert":
            raise ValueError("litert_delegate: a delegate is for backbone_runtime = 'litert'")
        return self

    def model_spec(self) -> ModelSpec:
        return ModelSpec(model=self.model, model_args=self.model_args, input_shape=self.input_shape, trainable=self.trainable)

    def checkpoint_path(self) -> Path:
        return self.state_dir / f"{self.node_id}.ckpt.npz"

    def patches_path(self) -> Path:
        """Where the run-time config patches live, so that they survive a restart and a reload."""
        return self.state_dir / f"{self.node_id}.patches.json"


def load_settings(config_file: str | Path | None = None, **flags: Any) -> AgentSettings:
    """Settings from ``config_file`` (TOML), then ``CLUE_*`` variables, then ``flags`` (None = not given).

    Raises ConfigError naming every problem.
    """
    return AgentSettings.load(config_file, **flags)


def nest_dotted(values: dict[str, Any]) -> dict[str, Any]:
    """``{"drift.window": 5}`` → ``{"drift": {"window": 5}}``: operators may write either form."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        head, _, rest = key.partition(".")
        if rest:
            if "." in rest:
                raise ConfigError(f"config key {key!r} nests too deep")
            existing = out.setdefault(head, {})
            if not isinstance(existing, dict):
                raise ConfigError(f"config key {key!r} conflicts with {head!r}")
            existing[rest] = value
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key].update(value)
        else:
            out[key] = value
    return out


def split_patch(
    values: dict[str, Any], learner: LearnerConfig, daemon: DaemonKnobs
) -> tuple[LearnerConfig, DaemonKnobs]:
    """Validate a whole patch against both the learner's and the daemon's knobs; apply neither here.

    Returns the new configs; raises ConfigError (naming every bad key) if any part is invalid.
    """
    nested = nest_dotted(values)
    daemon_keys = set(DaemonKnobs.model_fields)
    daemon_part = {k: v for k, v in nested.items() if k in daemon_keys}
    learner_part = {k: v for k, v in nested.items() if k not in daemon_keys}
    try:
        new_daemon = DaemonKnobs.model_validate({**daemon.model_dump(), **daemon_part})
    except ValidationError as exc:
        raise ConfigError(f"invalid config patch: {problems(exc)}") from exc
    new_learner = patched(learner, learner_part) if learner_part else learner
    return new_learner, new_daemon


def merge_patch(stored: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """``stored`` with the patch ``values`` laid over it, as ``patched`` applies a patch.

    A nested table is merged key by key unless the patch picks another ``type`` (another drift
    detector, operator or discard policy), which replaces it whole.
    """
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in stored.items()}
    for key, value in nest_dotted(values).items():
        old = out.get(key)
        if isinstance(value, dict) and isinstance(old, dict) and value.get("type", old.get("type")) == old.get("type"):
            old.update(value)
        else:
            out[key] = dict(value) if isinstance(value, dict) else value
    return out


def read_patches(path: Path) -> dict[str, Any]:
    """The stored run-time patches (empty when there are none); ConfigError for an unreadable file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read the run-time patches {path}: {exc}") from exc
    try:
        values = json.loads(text, parse_constant=_no_constant)
    except ValueError as exc:
        raise ConfigError(f"run-time patches {path} are not JSON: {exc}") from exc
    if not isinstance(values, dict):
        raise ConfigError(f"run-time patches {path} must hold a JSON object")
    return values


def write_patches(path: Path, values: dict[str, Any]) -> None:
    """Store the run-time patches atomically (a crash leaves the old file or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(values, f, indent=2, sort_keys=True, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


#: Settings a node's config report leaves out: the run-time knobs come in the report's own values.
_REPORTED_ELSEWHERE = frozenset({"learner", "daemon"})


def reported_settings(settings: AgentSettings) -> dict[str, Any]:
    """What the node started with, for ``clue-ctl config`` (`broker.wire.ConfigState.settings`).

    Never a password: a setting naming a password file says only whether it is set, and a
    password in the broker URL is masked. Values other than scalars and short lists of them are
    given as JSON text.
    """
    out: dict[str, Any] = {}
    for name in type(settings).model_fields:
        if name in _REPORTED_ELSEWHERE:
            continue
        value = getattr(settings, name)
        if "password" in name:
            value = None if value is None else "(set)"
        elif name == "broker":
            parts = urlsplit(value)
            if parts.password is not None:
                value = urlunsplit(parts._replace(netloc=f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")))
        elif isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        if not _scalar(value) and not (isinstance(value, list) and len(value) <= 64 and all(_scalar(v) for v in value)):
            value = json.dumps(value.model_dump(mode="json") if isinstance(value, BaseModel) else value, default=str)[:1024]
        out[name] = value
    return out


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) <= 1024)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def node_model(settings: AgentSettings) -> nn.Module:
    """The model ``settings`` name, holding their base weights; ConfigError naming the field that does not fit."""
    try:
        model = build_from_spec(settings.model_spec(), settings.num_classes, seed=settings.model_seed)
    except ModelError as exc:
        raise ConfigError(str(exc)) from exc
    if settings.base_weights is not None:
        try:
            load_weights(settings.base_weights, model)
        except ValueError as exc:
            raise ConfigError(f"base_weights: {exc}") from exc
    return model
