"""Split serving: a frozen backbone on its own engine, a trainable head in the learner (issue 12/13).

With ``trainable`` naming a head (``["head."]``) and the settings ``backbone = "backbone"``,
``head = "head"`` naming two submodules, `split_model` checks on a sample that
``model(x) == head(backbone(x))`` and hands the head to the `agent.learner.Learner` as its model:
the learner, the picker, knowledge transfer, the boosted helpers and FedAvg then work on the head
only, and every pooled helper shares the features the backbone computed once for the batch.

A `BackboneEngine` maps a batch ``x`` to the backbone's features: `TorchBackbone` (the torch
module on the learner's device, CPU or CUDA), `OnnxBackbone` (an ONNX file, int8 from
``clue-agent-export``, run by onnxruntime with the configured providers) or `LiteRtBackbone` (a
``.tflite`` file, run by the LiteRT interpreter, optionally through a delegate library such as
the Edge TPU's ``libedgetpu.so.1``). ``backbone_runtime`` picks one (`build_engine`).

An exported file comes with a sidecar ``<file>.json`` (`read_sidecar`) naming the backbone it was
exported from (`backbone_id`: a hash of the backbone's weights); a file exported from another
backbone is refused at start-up. ``backbone_id`` is folded into the head's ``arch_id`` and
``lineage``, so nodes whose backbones differ never exchange head blobs.

>>> from torch import nn
>>> net = nn.Sequential()
>>> net.add_module("backbone", nn.Sequential(nn.Linear(4, 8), nn.ReLU()))
>>> net.add_module("head", nn.Linear(8, 3))
>>> split = split_model(net, backbone="backbone", head="head", input_shape=(4,))
>>> split.feature_shape
(8,)
>>> TorchBackbone(split.backbone).features(torch.zeros(2, 4)).shape
torch.Size([2, 8])
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from agent.errors import ConfigError
from agent.models import lineage

#: The sidecar's format name and version.
SIDECAR_FORMAT = "clue-backbone"
SIDECAR_VERSION = 1
#: How far ``head(backbone(x))`` may be from ``model(x)`` (relative to the logits' scale).
SPLIT_RTOL = 1e-4
SPLIT_ATOL = 1e-5


@dataclass(frozen=True)
class Split:
    """A model cut in two: its frozen ``backbone`` and trainable ``head`` (the model's own submodules)."""

    backbone: nn.Module
    head: nn.Module
    input_shape: tuple[int, ...]
    feature_shape: tuple[int, ...]
    #: Hash of the backbone's weights (parameters and buffers): equal iff bit-identical.
    backbone_id: str


def split_model(
    model: nn.Module, *, backbone: str, head: str, input_shape: Sequence[int], sample: torch.Tensor | None = None
) -> Split:
    """Cut ``model`` into the submodules named ``backbone`` and ``head``; ConfigError naming the field if it cannot be.

    Every trainable parameter must lie in the head and none in the backbone, and on ``sample``
    (default: 8 seeded uniform samples in [0, 1)) the model in eval mode must give
    ``head(backbone(x))`` within a relative 1e-4. ``model``'s train/eval modes are put back after.
    """
    bb = _submodule(model, backbone, "backbone")
    hd = _submodule(model, head, "head")
    if bb is hd or bb is model or hd is model:
        raise ConfigError(f"backbone {backbone!r} and head {head!r} must be two distinct submodules of the model")
    trainable_bb = [n for n, p in bb.named_parameters() if p.requires_grad]
    if trainable_bb:
        raise ConfigError(
            f"backbone: {backbone!r} holds trainable parameters ({', '.join(trainable_bb[:4])}): set trainable to the head's prefix, such as [{head + '.'!r}]"
        )
    head_params = {id(p) for p in hd.parameters()}
    outside = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in head_params]
    if outside:
        raise ConfigError(f"head: trainable parameters outside {head!r} ({', '.join(outside[:4])}): only the head trains when the model is split")
    if not any(p.requires_grad for p in hd.parameters()):
        raise ConfigError(f"head: {head!r} has no trainable parameter: set trainable to its prefix, such as [{head + '.'!r}]")
    shape = tuple(int(s) for s in input_shape)
    if sample is None:
        sample = torch.rand(8, *shape, generator=torch.Generator().manual_seed(0))
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            x = sample.to(device)
            whole = model(x)
            try:
                features = bb(x)
                parts = hd(features)
            except Exception as exc:  # the user's modules: a shape that does not chain is the usual cause
                raise ConfigError(f"backbone/head: head(backbone(x)) raised {type(exc).__name__}: {exc}") from exc
    finally:
        for m, training in modes.items():
            m.training = training
    if not isinstance(features, torch.Tensor) or not isinstance(parts, torch.Tensor) or parts.shape != whole.shape:
        raise ConfigError(f"backbone/head: head(backbone(x)) does not give the model's logits {tuple(whole.shape)}")
    scale = float(whole.abs().max()) + 1.0
    gap = float((parts - whole).abs().max())
    if gap > SPLIT_RTOL * scale + SPLIT_ATOL:
        raise ConfigError(
            f"backbone/head: model(x) is not head(backbone(x)) (largest difference {gap:.3g} on a sample): the forward pass does more "
            f"than {backbone!r} then {head!r}; name the two submodules whose chain is the whole model"
        )
    return Split(bb, hd, shape, tuple(features.shape[1:]), backbone_identity(bb))


def backbone_identity(backbone: nn.Module) -> str:
    """Id of a backbone: a hash of its weights (parameters and buffers, with their names)."""
    return lineage(backbone.state_dict())


def _submodule(model: nn.Module, name: str, field: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        names = [n for n, _ in model.named_children()]
        raise ConfigError(f"{field}: the model has no submodule {name!r}; its children are {names}") from exc


def check_batch(x: torch.Tensor, input_shape: tuple[int, ...], input_range: tuple[float, float]) -> None:
    """ValueError for a batch the backbone must not see: as `Learner.check_inputs`, on the raw inputs."""
    if not torch.is_floating_point(x) or x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"inputs must be a float tensor with a sample axis and at least one feature axis, got {x.dtype} {tuple(x.shape)}")
    if tuple(x.shape[1:]) != input_shape:
        raise ValueError(f"inputs have samples of shape {tuple(x.shape[1:])}, the model takes {input_shape}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("inputs contain NaN or infinite values")
    low, high = input_range
    lowest, highest = (float(v) for v in torch.aminmax(x))
    if lowest < low or highest > high:
        raise ValueError(f"inputs span [{lowest:.4g}, {highest:.4g}], outside the declared input_range [{low:g}, {high:g}]")


class BackboneEngine(ABC):
    """Maps a batch ``(N, *input_shape)`` to the backbone's features ``(N, *feature_shape)``, float32, on ``device``."""

    #: The ``backbone_runtime`` value that picks it.
    name: ClassVar[str]

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)

    @abstractmethod
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's features of the batch ``x``."""

    def describe(self) -> str:
        """One line for the journal: the engine and what it runs on."""
        return self.name


class TorchBackbone(BackboneEngine):
    """The backbone's torch module, in eval mode on ``device``: float32, CPU or CUDA."""

    name = "torch"

    def __init__(self, module: nn.Module, device: torch.device | str = "cpu") -> None:
        super().__init__(device)
        self.module = module.to(self.device).eval()

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        self.module.eval()
        return self.module(x.to(self.device, non_blocking=True))

    def describe(self) -> str:
        return f"torch on {self.device}"


class OnnxBackbone(BackboneEngine):
    """An ONNX backbone (int8 QDQ from ``clue-agent-export``) run by onnxruntime with ``providers`` in order."""

    name = "onnxruntime"

    def __init__(
        self, path: str | Path, *, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 1, device: torch.device | str = "cpu"
    ) -> None:
        super().__init__(device)
        import onnxruntime as ort

        from agent.runtime import select_providers

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        try:
            self.session = ort.InferenceSession(str(path), options, providers=select_providers(providers))
        except ConfigError as exc:
            raise ConfigError(f"onnx_providers: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for an unreadable or invalid file
            raise ConfigError(f"backbone_model: onnxruntime cannot load {path}: {type(exc).__name__}: {exc}") from exc
        self._input = self.session.get_inputs()[0].name

    def features(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().to("cpu").numpy(), dtype=np.float32)
        (out,) = self.session.run(None, {self._input: array})
        return torch.from_numpy(out).to(self.device)

    def describe(self) -> str:
        return f"onnxruntime ({', '.join(self.session.get_providers())})"


class LiteRtBackbone(BackboneEngine):
    """A ``.tflite`` backbone run by the LiteRT interpreter (``ai-edge-litert``), optionally through ``delegate``.

    A model with integer inputs or outputs (fully quantised for the Edge TPU) is fed and read
    through its own scale and zero point. Its batch size is fixed (the Edge TPU takes static shapes
    only): a batch is run in slices of that size, the last one padded with zeros.
    """

    name = "litert"

    def __init__(self, path: str | Path, *, delegate: str | None = None, threads: int = 1, device: torch.device | str = "cpu") -> None:
        super().__init__(device)
        try:
            from ai_edge_litert.interpreter import Interpreter, load_delegate
        except ImportError as exc:
            raise ConfigError("backbone_runtime: 'litert' needs the LiteRT interpreter: pip install ai-edge-litert") from exc
        delegates = []
        if delegate:
            try:
                delegates.append(load_delegate(delegate))
            except (OSError, ValueError, RuntimeError) as exc:
                raise ConfigError(f"litert_delegate: cannot load {delegate!r}: {exc}") from exc
        try:
            self.interpreter = Interpreter(model_path=str(path), num_threads=threads, experimental_delegates=delegates or None)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"backbone_model: LiteRT cannot load {path}: {exc}") from exc
        self.delegate = delegate
        try:
            self.interpreter.allocate_tensors()
        except RuntimeError as exc:
            raise ConfigError(f"backbone_model: LiteRT cannot prepare {path}{' with ' + delegate if delegate else ''}: {exc}") from exc
        self._in = self.interpreter.get_input_details()[0]
        self._out = self.interpreter.get_output_details()[0]
        #: The model's fixed batch size.
        self.batch = int(self._in["shape"][0])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().to("cpu").numpy(), dtype=np.float32)
        if tuple(array.shape[1:]) != tuple(int(s) for s in self._in["shape"][1:]):
            raise ValueError(f"inputs of shape {array.shape[1:]} do not fit the LiteRT backbone's {list(self._in['shape'][1:])}")
        n, outs = array.shape[0], []
        for start in range(0, n, self.batch):
            piece = array[start : start + self.batch]
            if len(piece) < self.batch:
                piece = np.concatenate([piece, np.zeros((self.batch - len(piece), *piece.shape[1:]), np.float32)])
            self.interpreter.set_tensor(self._in["index"], _quantized(piece, self._in))
            self.interpreter.invoke()
            outs.append(_dequantized(self.interpreter.get_tensor(self._out["index"]), self._out))
        return torch.from_numpy(np.concatenate(outs)[:n]).to(self.device)

    def describe(self) -> str:
        return f"litert ({'delegate ' + self.delegate if self.delegate else 'CPU'})"


def _quantized(array: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    if dtype.kind == "f":
        return array.astype(dtype)
    scale, zero = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(array / scale + zero), info.min, info.max).astype(dtype)


def _dequantized(array: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    if np.dtype(detail["dtype"]).kind == "f":
        return np.array(array, dtype=np.float32)
    scale, zero = detail["quantization"]
    return ((array.astype(np.float32) - zero) * scale).astype(np.float32)


# -- exported files and their sidecars ----------------------------------------------------------


def sidecar_path(path: str | Path) -> Path:
    """Where the sidecar of an exported backbone lives: ``<file>.json`` beside it."""
    p = Path(path)
    return p.with_name(p.name + ".json")


def write_sidecar(path: str | Path, split: Split, *, engine: str, **report: Any) -> Path:
    """Write the sidecar of the backbone exported to ``path``: what it was exported from, and how it checked."""
    data = {
        "format": SIDECAR_FORMAT, "v": SIDECAR_VERSION, "engine": engine, "backbone_id": split.backbone_id,
        "input_shape": list(split.input_shape), "feature_shape": list(split.feature_shape),
        "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(), **report,
    }
    out = sidecar_path(path)
    out.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """The sidecar of the exported backbone ``path``; ConfigError naming ``backbone_model`` if absent or unreadable."""
    side = sidecar_path(path)
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"backbone_model: {side} is missing: clue-agent-export writes it beside {Path(path).name}; ship both") from exc
    except (OSError, ValueError) as exc:
        raise ConfigError(f"backbone_model: cannot read {side}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT or data.get("v") != SIDECAR_VERSION:
        raise ConfigError(f"backbone_model: {side} is not a {SIDECAR_FORMAT} v{SIDECAR_VERSION} sidecar")
    return data


def check_exported(path: str | Path, split: Split) -> dict[str, Any]:
    """ConfigError naming ``backbone_model`` unless ``path`` was exported from ``split``'s backbone and is intact."""
    if not Path(path).is_file():
        raise ConfigError(f"backbone_model: {path} is not a file")
    data = read_sidecar(path)
    if data.get("backbone_id") != split.backbone_id:
        raise ConfigError(
            f"backbone_model: {path} was exported from backbone {data.get('backbone_id')!r}, this model's backbone is "
            f"{split.backbone_id!r} (other base_weights?): export it again from these weights"
        )
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    if data.get("sha256") not in (None, digest):
        raise ConfigError(f"backbone_model: {path} is not the file its sidecar describes (sha256 differs): export it again")
    return data


def build_engine(
    runtime: str,
    split: Split,
    *,
    model_path: str | Path | None = None,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    delegate: str | None = None,
    threads: int = 1,
    device: torch.device | str = "cpu",
) -> BackboneEngine:
    """The engine ``runtime`` names, checked on two samples against ``split``'s feature shape.

    ``torch`` runs ``split.backbone``; ``onnxruntime`` and ``litert`` run ``model_path``, which
    must have been exported from this backbone (`check_exported`). ConfigError names the field.
    """
    engine: BackboneEngine
    if runtime == "torch":
        engine = TorchBackbone(split.backbone, device)
    else:
        if model_path is None:
            raise ConfigError(f"backbone_model: backbone_runtime = {runtime!r} needs the exported backbone's file (clue-agent-export)")
        check_exported(model_path, split)
        if runtime == "onnxruntime":
            engine = OnnxBackbone(model_path, providers=providers, threads=threads, device=device)
        elif runtime == "litert":
            engine = LiteRtBackbone(model_path, delegate=delegate, threads=threads, device=device)
        else:
            raise ConfigError(f"backbone_runtime: {runtime!r} is not torch, onnxruntime or litert")
    probe = torch.rand(2, *split.input_shape, generator=torch.Generator().manual_seed(1))
    try:
        out = engine.features(probe)
    except Exception as exc:  # noqa: BLE001 - the engine's own error types: a file whose input does not fit
        raise ConfigError(f"backbone_model: {engine.describe()} cannot run a batch of {list(split.input_shape)}: {type(exc).__name__}: {exc}") from exc
    if tuple(out.shape) != (2, *split.feature_shape):
        raise ConfigError(f"backbone_model: gives features of shape {list(out.shape[1:])}, the head takes {list(split.feature_shape)}")
    return engine
