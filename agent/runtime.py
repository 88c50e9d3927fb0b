"""Where the agent's models run: the torch device, and onnxruntime for serving the helpers.

``resolve_device`` turns the config's ``"auto" | "cpu" | "cuda[:N]"`` into a ``torch.device``.
``OnnxModel`` exports a frozen copy of a torch model (softmax included) to ONNX in memory and runs
it in onnxruntime. ``EnsembleRuntime`` is the learner's ``inference`` hook for ``runtime = "onnx"``:
each pooled helper is exported once, when it appears, and served by onnxruntime from then on; the
target, and a helper's live branch (``kt_apply = "branch"``: it learns every batch like the
target), are served by torch; the learner's operator combines them.

Why the target stays in torch: the agent retrains it on every labelled batch, so an ONNX copy is
stale by the next batch and no export can be amortised. An export takes ~10 ms for the MLPs and
~75 ms for ``mobilenet_s`` on one core: 5-40× an MLP forward pass at batch 32-200, and for the CNN
export plus onnxruntime pass cost about what a torch pass does. In ``bench.onnx_vs_torch`` (batch
200, predict + train, one pooled helper) exporting the target after every train step served
0.5-0.6× torch's batches/s for the MLPs and 1.0× for the CNN; this design 1.0-1.07× and
1.07-1.09×. A helper is frozen while it is pooled, so its one export serves every batch after it.

The export uses torch's TorchScript-based exporter (``dynamo=False``): it needs only torch and
onnx, while the newer ``torch.export`` exporter also needs ``onnxscript``, which is not a
dependency. onnxruntime itself is imported only when a runtime or model is built.

The export runs with PyTorch's fused attention kernel turned off: in eval mode without grad,
``nn.MultiheadAttention`` and the ``nn.Transformer*`` layers take ``aten::_native_multi_head_attention``,
which has no ONNX form, where the plain path computes the same attention and exports. A helper
that still cannot be exported or loaded (a user's model with an operator ONNX lacks, such as
``torch.fft``) is served by torch instead, logged once and listed in ``EnsembleRuntime.fallbacks``:
the node keeps serving either way.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from agent.errors import ConfigError
from agent.learner import Learner

log = logging.getLogger(__name__)

MIN_OPSET = 17
DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


def resolve_device(spec: str) -> torch.device:
    """``"auto"`` (CUDA when available, else CPU), ``"cpu"`` or ``"cuda[:N]"``; ConfigError if unusable."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ConfigError(f"device {spec!r} is not 'auto', 'cpu' or 'cuda[:N]'") from exc
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f"device {spec!r} is not 'auto', 'cpu' or 'cuda[:N]'")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r} asked for, but torch finds no CUDA device (torch {torch.__version__})")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {spec!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def select_providers(requested: Sequence[str]) -> list[str]:
    """The requested onnxruntime execution providers that this onnxruntime offers, in order.

    ConfigError when none is available; a warning names those that are not.
    """
    import onnxruntime as ort  # here, not at import: only an agent with runtime = "onnx" loads it

    requested = list(requested)
    available = ort.get_available_providers()
    usable = [p for p in requested if p in available]
    missing = [p for p in requested if p not in available]
    if not usable:
        raise ConfigError(
            f"none of the requested onnxruntime providers {requested} is available; this onnxruntime "
            f"{ort.__version__} offers {available}"
        )
    if missing:
        log.warning("onnxruntime providers %s are not available here; using %s", missing, usable)
    return usable


def export_onnx(model: nn.Module, example: torch.Tensor, *, opset: int = MIN_OPSET) -> bytes:
    """ONNX bytes of ``softmax(model(x))`` in eval mode, batch axis dynamic; ``model`` is not changed."""
    if opset < MIN_OPSET:
        raise ValueError(f"opset must be ≥ {MIN_OPSET}, got {opset}")
    frozen = copy.deepcopy(model).to("cpu").eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    wrapped = nn.Sequential(frozen, nn.Softmax(dim=1))
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings(), _plain_attention():
        # The TorchScript exporter is deprecated in favour of one that needs onnxscript (see above).
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            wrapped,
            (example.detach().to("cpu", torch.float32),),
            buf,
            dynamo=False,
            opset_version=opset,
            input_names=["x"],
            output_names=["probs"],
            dynamic_axes={"x": {0: "batch"}, "probs": {0: "batch"}},
            do_constant_folding=True,
            training=torch.onnx.TrainingMode.EVAL,
        )
    return buf.getvalue()


@contextlib.contextmanager
def _plain_attention() -> Iterator[None]:
    """PyTorch's fused attention off for the duration (its kernel has no ONNX form; see the module docstring)."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def _as_array(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu").numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


class OnnxModel:
    """A frozen copy of a torch model, run by onnxruntime.

    ``example`` fixes the shape of one sample (its batch size does not matter); ``providers`` are
    tried in order (see ``select_providers``); ``intra_op_num_threads`` ≥ 1, or 0 to let
    onnxruntime pick (all cores, which fights the worker thread for them).
    """

    def __init__(
        self,
        model: nn.Module,
        example: np.ndarray | torch.Tensor,
        *,
        providers: Sequence[str] = DEFAULT_PROVIDERS,
        intra_op_num_threads: int = 1,
        opset: int = MIN_OPSET,
    ) -> None:
        if intra_op_num_threads < 0:
            raise ConfigError(f"intra_op_num_threads must be ≥ 0, got {intra_op_num_threads}")
        array = _as_array(example)
        if array.ndim < 2 or array.shape[0] < 1:
            raise ValueError(f"example must be a batch (N, ...) with N ≥ 1, got shape {array.shape}")
        import onnxruntime as ort  # here, not at import: only an agent with runtime = "onnx" loads it

        sample = torch.from_numpy(array[:1])
        self.sample_shape = tuple(array.shape[1:])
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_num_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(
            export_onnx(model, sample, opset=opset), options, providers=select_providers(providers)
        )

    @property
    def providers(self) -> list[str]:
        """The providers the session actually uses."""
        return self.session.get_providers()

    def predict_proba(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Class probabilities (N, C), float32, on the CPU."""
        array = _as_array(x)
        if tuple(array.shape[1:]) != self.sample_shape or array.ndim != len(self.sample_shape) + 1:
            raise ValueError(f"input of shape {array.shape} does not match (N, {', '.join(map(str, self.sample_shape))})")
        (probs,) = self.session.run(None, {"x": array})
        return torch.from_numpy(probs)


class EnsembleRuntime:
    """Serves a learner's frozen helpers through onnxruntime; plug it in as ``learner.inference``.

    Called as ``runtime(learner, x)`` it returns what the learner's torch path returns: target
    and per-helper probabilities (N, C), on ``x``'s device, the target from torch and the helpers
    from onnxruntime (see the module docstring for why the target stays in torch).

    A pooled helper is frozen, so its id and model object are its version: each is exported once,
    on the first call that sees it, and dropped when it leaves the pool. ``exports`` counts the
    exports tried; ``fallbacks`` names the pooled helpers whose export or onnxruntime session
    failed, and why: torch serves those. Meant for one learner, called from the thread that owns it.
    """

    def __init__(
        self,
        *,
        providers: Sequence[str] = DEFAULT_PROVIDERS,
        intra_op_num_threads: int = 1,
        opset: int = MIN_OPSET,
    ) -> None:
        if intra_op_num_threads < 0:
            raise ConfigError(f"intra_op_num_threads must be ≥ 0, got {intra_op_num_threads}")
        if opset < MIN_OPSET:
            raise ConfigError(f"opset must be ≥ {MIN_OPSET}, got {opset}")
        self.providers = select_providers(providers)
        self.intra_op_num_threads = intra_op_num_threads
        self.opset = opset
        self.exports = 0
        #: Pooled helpers onnxruntime could not take (member id → why); torch serves them.
        self.fallbacks: dict[str, str] = {}
        self._helpers: dict[str, tuple[nn.Module, OnnxModel | None]] = {}

    @torch.no_grad()
    def __call__(self, learner: Learner, x: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Target and per-helper class probabilities (N, C) in pool order, on ``x``'s device (CPU for arrays)."""
        array = _as_array(x)
        members = learner.members()
        for gone in set(self._helpers) - {m.member_id for m in members if not m.live}:
            del self._helpers[gone]
            self.fallbacks.pop(gone, None)
        device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
        inputs = x if isinstance(x, torch.Tensor) else torch.from_numpy(array)
        learner.model.eval()
        target = torch.softmax(learner.model(inputs.to(learner.device)), dim=1).to(device)
        helpers = []
        for m in members:
            # A live branch learns every batch like the target, so torch serves it too.
            onnx = None if m.live else self._helper_model(m.member_id, m.model, array)
            if onnx is None:
                helpers.append(torch.softmax(m.model.eval()(inputs.to(learner.device)), dim=1).to(device))
            else:
                helpers.append(onnx.predict_proba(array).to(device))
        return target, helpers

    def predict(self, learner: Learner, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Served class probabilities (N, C): the learner's operator over the target and its pool."""
        target, helpers = self(learner, x)
        members = learner.members()
        return learner.operator.combine(target, helpers, [m.classes for m in members], [m.member_id for m in members])

    def _export(self, model: nn.Module, x: np.ndarray) -> OnnxModel:
        self.exports += 1
        return OnnxModel(
            model, x, providers=self.providers, intra_op_num_threads=self.intra_op_num_threads, opset=self.opset
        )

    def _helper_model(self, helper_id: str, model: nn.Module, x: np.ndarray) -> OnnxModel | None:
        """The helper's onnxruntime session, exported on first sight; None: torch serves it."""
        cached = self._helpers.get(helper_id)
        if cached is None or cached[0] is not model or (cached[1] is not None and cached[1].sample_shape != x.shape[1:]):
            try:
                session: OnnxModel | None = self._export(model, x)
                self.fallbacks.pop(helper_id, None)
            except Exception as exc:  # noqa: BLE001 - the user's model: an operator ONNX lacks, or a graph onnxruntime refuses
                session = None
                self.fallbacks[helper_id] = f"{type(exc).__name__}: {exc}"
                log.warning("helper %s cannot run in onnxruntime, torch serves it: %s", helper_id, self.fallbacks[helper_id])
            cached = (model, session)
            self._helpers[helper_id] = cached
        return cached[1]
