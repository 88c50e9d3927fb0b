"""``clue-agent-export``: the frozen backbone to an int8 model for onnxruntime or LiteRT (an Edge TPU).

The backbone of a split model (`agent.backbone`) is quantised to int8 with a sample of the base
data as calibration set, then checked against torch on that same sample before anything is
written: the head's accuracy on the labelled calibration data with the int8 features must be
within ``max_accuracy_drop`` points of its accuracy with torch's float features, and the features'
relative error is reported. A model that changes the head's accuracy more is refused
(`ExportRefused`) and no file is written.

- **ONNX int8 (QDQ)**: ``torch.onnx.export`` (TorchScript exporter, batch axis dynamic), then
  ``onnxruntime.quantization.quantize_static`` with a calibration reader over the sample:
  per-channel int8 weights, uint8 activations, QuantizeLinear/DequantizeLinear pairs. Needs nothing
  beyond onnx and onnxruntime.
- **LiteRT int8 (.tflite)**: PT2E quantisation (``torch.export`` → ``prepare_pt2e`` → the sample
  → ``convert_pt2e``) with the LiteRT quantiser, converted by ``litert-torch``: int8 weights,
  activations, inputs and outputs, what ``edgetpu_compiler`` takes. The converter is the optional
  extra ``[litert]`` (README); without it ``--tflite`` is refused with the install command.

Each written file gets its sidecar ``<file>.json`` (`agent.backbone.write_sidecar`): the backbone it
came from, the shapes, the file's hash and the check's figures. The agent refuses a file whose
sidecar names another backbone.
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from agent.backbone import BackboneEngine, LiteRtBackbone, OnnxBackbone, Split, TorchBackbone, split_model, write_sidecar
from agent.errors import ClueError, ConfigError
from agent.settings import load_settings, node_model

#: Default for how many points of head accuracy the int8 backbone may cost.
MAX_ACCURACY_DROP = 1.0
#: Default calibration sample size.
CALIBRATION_SAMPLES = 512
#: The LiteRT model's fixed batch size (the Edge TPU takes static shapes; the engine runs slices of it).
TFLITE_BATCH = 32
LITERT_INSTALL = "pip install -e '.[litert]'  (the converter litert-torch: about 1 GB with jax and transformers)"


class ExportRefused(ClueError):
    """The exported backbone changes the head's accuracy by more than allowed; nothing was written."""


@dataclass(frozen=True)
class ExportCheck:
    """How an exported backbone compares with torch's on the calibration data."""

    engine: str
    samples: int
    accuracy_torch: float
    accuracy_export: float
    #: Accuracy change in points (percentage points): export − torch.
    accuracy_change: float
    #: ‖f_export − f_torch‖ / ‖f_torch‖ over the whole sample.
    feature_rel_error: float
    #: Share of samples whose head prediction is the same with either backbone.
    agreement: float


def head_accuracy(split: Split, engine: BackboneEngine, x: np.ndarray, y: np.ndarray, batch: int = 256) -> tuple[float, torch.Tensor]:
    """The head's accuracy (0..1) on ``x, y`` with ``engine``'s features, and those features (CPU)."""
    feats, hits = [], 0
    device = next(split.head.parameters()).device
    split.head.eval()
    with torch.no_grad():
        for start in range(0, len(x), batch):
            f = engine.features(torch.from_numpy(x[start : start + batch])).to("cpu")
            feats.append(f)
            pred = split.head(f.to(device)).argmax(dim=1).cpu().numpy()
            hits += int((pred == y[start : start + batch]).sum())
    return hits / max(len(x), 1), torch.cat(feats)


def compare(split: Split, engine: BackboneEngine, x: np.ndarray, y: np.ndarray) -> ExportCheck:
    """`ExportCheck` of ``engine`` against torch's float backbone on ``x, y``."""
    acc_t, f_t = head_accuracy(split, TorchBackbone(split.backbone, next(split.backbone.parameters()).device), x, y)
    acc_e, f_e = head_accuracy(split, engine, x, y)
    device = next(split.head.parameters()).device
    with torch.no_grad():
        agree = float((split.head(f_t.to(device)).argmax(1) == split.head(f_e.to(device)).argmax(1)).float().mean())
    rel = float(torch.linalg.vector_norm(f_e - f_t) / torch.linalg.vector_norm(f_t).clamp_min(1e-12))
    return ExportCheck(engine.name, len(x), acc_t, acc_e, 100.0 * (acc_e - acc_t), rel, agree)


class _Calibration:
    """onnxruntime's CalibrationDataReader over a sample, in batches."""

    def __init__(self, name: str, x: np.ndarray, batch: int = 64) -> None:
        self._batches = [{name: x[i : i + batch]} for i in range(0, len(x), batch)]
        self._it: Iterator[dict[str, np.ndarray]] = iter(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._batches)


def onnx_int8(split: Split, x: np.ndarray, path: Path) -> None:
    """Write ``split.backbone`` to ``path`` as int8 QDQ ONNX, calibrated on ``x``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    backbone = split.backbone
    device = next(backbone.parameters()).device
    buf = io.BytesIO()
    backbone.to("cpu").eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                backbone, (torch.from_numpy(x[:2]),), buf, dynamo=False, opset_version=17, input_names=["x"], output_names=["features"],
                dynamic_axes={"x": {0: "batch"}, "features": {0: "batch"}}, do_constant_folding=True, training=torch.onnx.TrainingMode.EVAL,
            )
    finally:
        backbone.to(device)
    with tempfile.TemporaryDirectory() as tmp:
        fp32, pre = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx"
        fp32.write_bytes(buf.getvalue())
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre), str(path), _Calibration("x", x), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
        )


def litert_available() -> bool:
    """Whether the LiteRT converter (the ``[litert]`` extra) is installed."""
    try:
        import litert_torch  # noqa: F401
    except ImportError:
        return False
    return True


def litert_int8(split: Split, x: np.ndarray, path: Path, batch: int = TFLITE_BATCH) -> None:
    """Write ``split.backbone`` to ``path`` as fully int8 LiteRT (.tflite) for batches of ``batch``, calibrated on ``x`` (needs ``[litert]``)."""
    try:
        import litert_torch
        from litert_torch.quantize import pt2e_quantizer
        from litert_torch.quantize.quant_config import QuantConfig
        from torchao.quantization.pt2e import quantize_pt2e
    except ImportError as exc:
        raise ConfigError(f"tflite: the LiteRT converter is not installed: {LITERT_INSTALL}") from exc
    device = next(split.backbone.parameters()).device
    module = split.backbone.to("cpu").eval()
    try:
        example = (torch.from_numpy(np.resize(x, (batch, *x.shape[1:]))),)
        graph = torch.export.export(module, example).module()
        quantizer = pt2e_quantizer.PT2EQuantizer().set_global(pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
        graph = quantize_pt2e.prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            for start in range(0, len(x) - batch + 1, batch):
                graph(torch.from_numpy(x[start : start + batch]))
        graph = quantize_pt2e.convert_pt2e(graph, fold_quantize=False)
        litert_torch.convert(graph, example, quant_config=QuantConfig(pt2e_quantizer=quantizer)).export(str(path))
    finally:
        split.backbone.to(device)


def export_backbone(
    split: Split,
    x: np.ndarray,
    y: np.ndarray,
    *,
    onnx: Path | None = None,
    tflite: Path | None = None,
    max_accuracy_drop: float = MAX_ACCURACY_DROP,
    providers: tuple[str, ...] = ("CPUExecutionProvider",),
    tflite_batch: int = TFLITE_BATCH,
) -> dict[str, ExportCheck]:
    """Export the backbone to ``onnx`` and/or ``tflite``, each checked on ``x, y`` first (see the module docstring).

    ``x``: calibration inputs ``(N, *split.input_shape)`` float32; ``y``: their labels. Raises
    ExportRefused (nothing written for that file) when the head's accuracy changes by more than
    ``max_accuracy_drop`` points; files already written for the other format stay.
    """
    if onnx is None and tflite is None:
        raise ConfigError("name an output: --onnx and/or --tflite")
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(len(x), *split.input_shape)
    y = np.asarray(y, dtype=np.int64)
    checks: dict[str, ExportCheck] = {}
    for target, engine_name in ((onnx, "onnxruntime"), (tflite, "litert")):
        if target is None:
            continue
        target = Path(target)
        with tempfile.TemporaryDirectory() as tmp:
            staged = Path(tmp) / target.name
            if engine_name == "onnxruntime":
                onnx_int8(split, x, staged)
                engine: BackboneEngine = OnnxBackbone(staged, providers=providers)
            else:
                litert_int8(split, x, staged, batch=tflite_batch)
                engine = LiteRtBackbone(staged)
            check = compare(split, engine, x, y)
            if abs(check.accuracy_change) > max_accuracy_drop:
                raise ExportRefused(
                    f"{target}: not written: the int8 backbone ({engine_name}) changes the head's accuracy on the {check.samples} calibration "
                    f"samples from {100 * check.accuracy_torch:.2f} % to {100 * check.accuracy_export:.2f} % ({check.accuracy_change:+.2f} points; "
                    f"max_accuracy_drop is {max_accuracy_drop:g}); feature error {check.feature_rel_error:.3f}. A larger or more representative "
                    "calibration sample may help; a backbone that quantises badly should be served by torch"
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(staged, target)
        write_sidecar(target, split, engine=engine_name, quantization="int8", check=asdict(check))
        checks[engine_name] = check
    return checks


def calibration_data(path: Path, samples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``samples`` rows drawn (seeded) from an ``.npz`` with arrays ``x`` and ``y`` (uint8 ``x`` is scaled to [0, 1])."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "x" not in npz.files or "y" not in npz.files:
                raise ConfigError(f"data: {path} must hold arrays x and y (np.savez(path, x=x, y=y)); it holds {npz.files}")
            x, y = npz["x"], npz["y"]
    except (OSError, ValueError) as exc:
        raise ConfigError(f"data: cannot read {path}: {exc}") from exc
    if len(x) != len(y) or len(x) == 0:
        raise ConfigError(f"data: {path}: x has {len(x)} samples and y {len(y)}")
    pick = np.random.default_rng(seed).permutation(len(x))[: min(samples, len(x))]
    xs = x[pick].astype(np.float32) / (255.0 if x.dtype == np.uint8 else 1.0)
    if not np.isfinite(xs).all():
        raise ConfigError(f"data: {path}: x holds NaN or infinite values")
    return xs, y[pick].astype(np.int64)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clue-agent-export",
        description="Export the frozen backbone of a split model (the agent's settings) to int8 ONNX and/or LiteRT, checked against torch.",
    )
    p.add_argument("--config", type=Path, required=True, help="the agent's TOML settings (model, base_weights, backbone, head, trainable)")
    p.add_argument("--data", type=Path, required=True, help="calibration data: an .npz with x (N, ...) and y (N,) from the base data")
    p.add_argument("--onnx", type=Path, help="write the int8 QDQ ONNX backbone here")
    p.add_argument("--tflite", type=Path, help="write the int8 LiteRT backbone here (needs the [litert] extra)")
    p.add_argument("--tflite-batch", type=int, default=TFLITE_BATCH, help=f"the LiteRT model's fixed batch size (default {TFLITE_BATCH})")
    p.add_argument("--samples", type=int, default=CALIBRATION_SAMPLES, help=f"calibration samples drawn from --data (default {CALIBRATION_SAMPLES})")
    p.add_argument("--max-accuracy-drop", type=float, default=MAX_ACCURACY_DROP, help=f"points of head accuracy the export may change (default {MAX_ACCURACY_DROP:g})")
    return p


def main(argv: list[str] | None = None) -> int:
    """Export, check and write; exit 0, 78 for a bad setting or file, 1 for a refused export."""
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.config, node_id="export")
        if settings.backbone is None or settings.head is None:
            raise ConfigError(f"{args.config}: set backbone and head (the model's two submodules) to export the backbone")
        spec = settings.model_spec()
        model = node_model(settings)
        split = split_model(model, backbone=settings.backbone, head=settings.head, input_shape=spec.sample_shape())
        x, y = calibration_data(args.data, args.samples)
        if int(np.prod(x.shape[1:])) != int(np.prod(split.input_shape)):
            raise ConfigError(f"data: {args.data} has samples of shape {list(x.shape[1:])}, the model takes {list(split.input_shape)}")
        checks = export_backbone(
            split, x.reshape(len(x), *split.input_shape), y, onnx=args.onnx, tflite=args.tflite,
            max_accuracy_drop=args.max_accuracy_drop, providers=tuple(settings.onnx_providers), tflite_batch=args.tflite_batch,
        )
    except ConfigError as exc:
        print(f"clue-agent-export: {exc}", file=sys.stderr)
        return 78
    except ExportRefused as exc:
        print(f"clue-agent-export: {exc}", file=sys.stderr)
        return 1
    for name, c in checks.items():
        print(
            f"{name}: head accuracy {100 * c.accuracy_torch:.2f} % (torch float32) → {100 * c.accuracy_export:.2f} % (int8), "
            f"{c.accuracy_change:+.2f} points; feature error {c.feature_rel_error:.4f}; agreement {100 * c.agreement:.1f} % on {c.samples} samples"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
