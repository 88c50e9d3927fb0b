"""Atomic, pickle-free checkpoints of a learner's long-lived state.

One file is an uncompressed ``.npz`` (a zip of ``.npy`` arrays, each member CRC-checked on read)
holding named numeric arrays and one JSON metadata array; it is read back with
``allow_pickle=False``, so a hostile file can at worst be refused (``torch.save``/``torch.load``
unpickle, which would run code). Members:

- ``model/<name>``: what the node learns (`agent.models.learnt_state`): its trainable
  parameters, each once (a tied one under its first name), and every buffer (batch-norm
  statistics and counters) outside frozen modules;
- ``optim/<i>/<key>``: the optimiser's per-parameter tensors (Adam: ``step``, ``exp_avg``,
  ``exp_avg_sq``) for the i-th trainable parameter;
- ``hist``: the long-run class histogram;
- ``meta``: UTF-8 JSON with the format name and version, ``arch_id``, ``lineage``, number of
  classes, batch counter, the applied ``LearnerConfig``, the optimiser's class and param groups.

Saved: what took the node many batches to learn (after a promotion, the target *is* the promoted
branch, so what a helper taught it is saved). Not saved: pooled helpers (ephemeral by design:
built for one drift and discarded after it), with their live branches, the guard a promotion left
in the pool and the trust operator's per-class weights, which all belong to the pool; the drift detector's window, the reservoir and the
recent per-batch histories, which refill within a few batches after a restart. Not saved either:
frozen parameters and the buffers of frozen modules (``ModelSpec.trainable``). Nothing ever
changes them, so they are the base weights the node is rebuilt from at start, which ``lineage``
vouches for; a frozen backbone is not written again every ``checkpoint_every`` batches.

Writes go to a temporary file beside the target, are fsynced, renamed over it, and the directory
is fsynced: a crash at any point leaves either the old or the new checkpoint, never a mix. The
checkpoint it replaces is kept as ``<name>.prev.npz``, and ``load_newest_good`` falls back to it when
the newest one is refused, so one bad file never bricks a node. A state holding a NaN or an
infinity is never written. One process saves a given path (the temporary name is fixed, so a
crashed save leaves one stray file that the next save overwrites).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from pydantic import ValidationError

from agent.config import LearnerConfig
from agent.errors import CheckpointError
from agent.learner import Learner
from agent.models import learnt_state
from service.settings import problems

FORMAT = "clue-edge-checkpoint"
VERSION = 1
_DTYPES = frozenset({"float16", "float32", "float64", "int32", "int64", "uint8", "bool"})


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint said about itself."""

    path: Path
    saved_at: float
    batch_index: int
    config: LearnerConfig


def save_checkpoint(path: str | os.PathLike[str], learner: Learner) -> Path:
    """Write ``learner``'s state to ``path`` atomically; returns the path.

    Call it from the thread that owns the learner (the daemon's worker), between batches.
    """
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    learnt = learnt_state(learner.model)
    for name, tensor in learnt.items():
        arrays[f"model/{name}"] = _to_numpy(tensor, f"model/{name}")
    optim = learner.optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in optim["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                arrays[f"optim/{index}/{key}"] = _to_numpy(value, f"optim/{index}/{key}")
            else:
                scalars.setdefault(str(index), {})[key] = value
    arrays["hist"] = np.asarray(learner.longrun_hist, dtype=np.int64)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "saved_at": time.time(),
        "arch_id": learner.arch_id,
        "lineage": learner.lineage,
        "num_classes": learner.num_classes,
        "batch_index": learner.batch_index,
        "config": learner.config.model_dump(mode="json"),
        "model": list(learnt),
        "optimizer": {
            "type": type(learner.optimizer).__name__,
            "param_groups": optim["param_groups"],
            "scalars": scalars,
        },
    }
    bad = [name for name, array in arrays.items() if array.dtype.kind == "f" and not np.isfinite(array).all()]
    if bad:
        raise CheckpointError(f"refusing to checkpoint a non-finite state: {', '.join(sorted(bad)[:5])} hold NaN or infinity")
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    _atomic_write(path, lambda f: np.savez(f, **arrays), keep=previous_path(path))
    return path


def previous_path(path: str | os.PathLike[str]) -> Path:
    """Where the checkpoint before the newest one is kept: ``x.ckpt.npz`` → ``x.ckpt.prev.npz``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def load_newest_good(
    path: str | os.PathLike[str], learner: Learner, *, restore_config: bool = True
) -> tuple[CheckpointInfo | None, list[str]]:
    """Restore from ``path``, or from the previous checkpoint when the newest is missing or refused.

    Returns the checkpoint used (None when neither file exists) and why each file tried before it
    was refused. Raises CheckpointError, the learner untouched, when files exist and none is good.
    """
    refusals: list[str] = []
    candidates = [p for p in (Path(path), previous_path(path)) if p.exists()]
    for candidate in candidates:
        try:
            return load_checkpoint(candidate, learner, restore_config=restore_config), refusals
        except CheckpointError as exc:
            refusals.append(str(exc))
    if refusals:
        raise CheckpointError("no usable checkpoint: " + "; ".join(refusals))
    return None, refusals


def load_checkpoint(path: str | os.PathLike[str], learner: Learner, *, restore_config: bool = True) -> CheckpointInfo:
    """Restore ``learner`` (same architecture and base weights) from ``path``.

    Everything is read and validated first (format, arch_id, lineage, names, shapes, dtypes,
    finite values, config); only then is the learner changed. Raises CheckpointError, with the
    learner untouched, for a missing, truncated, corrupt or foreign file. ``restore_config=False``
    keeps the learner's current config (the saved one is still validated and returned).
    """
    path = Path(path)
    arrays = _read(path)
    meta = _meta(arrays, path)
    where = f"checkpoint {path}"
    if meta.get("arch_id") != learner.arch_id:
        raise CheckpointError(f"{where} is for architecture {meta.get('arch_id')!r}, this model is {learner.arch_id!r}")
    if meta.get("lineage") != learner.lineage:
        raise CheckpointError(f"{where} descends from base weights {meta.get('lineage')!r}, this node from {learner.lineage!r}")
    if meta.get("num_classes") != learner.num_classes:
        raise CheckpointError(f"{where} has {meta.get('num_classes')} classes, this node {learner.num_classes}")
    try:
        config = LearnerConfig.model_validate(meta.get("config"))
    except ValidationError as exc:
        raise CheckpointError(f"{where} holds an invalid config: {problems(exc)}") from exc
    batch_index = meta.get("batch_index")
    if not isinstance(batch_index, int) or isinstance(batch_index, bool) or batch_index < 0:
        raise CheckpointError(f"{where} has a bad batch counter {batch_index!r}")
    saved_at = meta.get("saved_at")
    if not isinstance(saved_at, (int, float)) or not math.isfinite(saved_at):
        raise CheckpointError(f"{where} has a bad timestamp {saved_at!r}")

    model_state = _model_state(arrays, meta, learner, where)
    optim_state = _optimizer_state(arrays, meta, learner, where)
    hist = arrays.get("hist")
    if hist is None or hist.dtype != np.int64 or hist.shape != (learner.num_classes,) or (hist < 0).any():
        raise CheckpointError(f"{where} has a bad class histogram")
    expected = {"meta", "hist", *(f"model/{k}" for k in model_state)}
    stray = set(arrays) - expected - {k for k in arrays if k.startswith("optim/")}
    if stray:
        raise CheckpointError(f"{where} has unexpected members {sorted(stray)}")

    # Validated: from here on nothing is expected to fail.
    if restore_config:
        learner.apply_config(config.model_dump())
    # Not strict: the frozen tensors and a tied tensor's other names are the model's own already.
    learner.model.load_state_dict(model_state, strict=False)
    learner.optimizer.load_state_dict(optim_state)
    # The config is authoritative for the learning rate, whichever config is now in force.
    for group in learner.optimizer.param_groups:
        group["lr"] = learner.config.lr
    learner.longrun_hist = hist.copy()
    learner.batch_index = batch_index
    return CheckpointInfo(path=path, saved_at=float(saved_at), batch_index=batch_index, config=config)


def _to_numpy(tensor: torch.Tensor, name: str) -> np.ndarray:
    array = tensor.detach().to("cpu").contiguous().numpy()
    if array.dtype.name not in _DTYPES:
        raise CheckpointError(f"cannot checkpoint {name}: dtype {array.dtype} is not one of {sorted(_DTYPES)}")
    return array


def _atomic_write(path: Path, write: Callable[[BinaryIO], None], *, keep: Path | None = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if keep is not None and path.exists():
            # A second name for the old file, so ``path`` exists at every instant of the swap.
            kept = keep.with_name(f".{keep.name}.tmp")
            kept.unlink(missing_ok=True)
            try:
                os.link(path, kept)
            except OSError:  # a file system without hard links
                shutil.copyfile(path, kept)
            os.replace(kept, keep)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # The rename itself must reach the disk, or a power cut could bring back the old name.
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(path: Path) -> dict[str, np.ndarray]:
    try:
        with open(path, "rb") as f:
            return _read_npz(f)
    except FileNotFoundError as exc:
        raise CheckpointError(f"no checkpoint at {path}") from exc
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: {exc}") from exc


def _read_npz(f: BinaryIO) -> dict[str, np.ndarray]:
    loaded = np.load(f, allow_pickle=False)
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ValueError("not an .npz archive")
    with loaded:
        # Reading each member whole makes zipfile verify its CRC.
        return {name: loaded[name] for name in loaded.files}


def _meta(arrays: Mapping[str, np.ndarray], path: Path) -> dict[str, Any]:
    raw = arrays.get("meta")
    if raw is None or raw.dtype != np.uint8 or raw.ndim != 1:
        raise CheckpointError(f"checkpoint {path} has no metadata")
    try:
        meta = json.loads(raw.tobytes().decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} has unreadable metadata: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a CLUE Edge checkpoint")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {meta.get('version')!r}; this code reads {VERSION}")
    return meta


def _checked(array: np.ndarray | None, name: str, like: torch.Tensor, where: str) -> torch.Tensor:
    if array is None:
        raise CheckpointError(f"{where} lacks {name}")
    if array.dtype.name not in _DTYPES:
        raise CheckpointError(f"{where}: {name} has unsupported dtype {array.dtype}")
    want = like.detach().to("cpu")
    if tuple(array.shape) != tuple(want.shape):
        raise CheckpointError(f"{where}: {name} has shape {tuple(array.shape)}, expected {tuple(want.shape)}")
    tensor = torch.from_numpy(array.copy())
    if tensor.dtype != want.dtype:
        raise CheckpointError(f"{where}: {name} has dtype {tensor.dtype}, expected {want.dtype}")
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise CheckpointError(f"{where}: {name} holds NaN or infinite values")
    return tensor


def _model_state(
    arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any], learner: Learner, where: str
) -> dict[str, torch.Tensor]:
    live = learnt_state(learner.model)
    if meta.get("model") != list(live):
        raise CheckpointError(f"{where} holds other model entries than what this model learns")
    return {name: _checked(arrays.get(f"model/{name}"), f"model/{name}", t, where) for name, t in live.items()}


def _optimizer_state(
    arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any], learner: Learner, where: str
) -> dict[str, Any]:
    saved = meta.get("optimizer")
    live = learner.optimizer.state_dict()
    if not isinstance(saved, dict) or saved.get("type") != type(learner.optimizer).__name__:
        raise CheckpointError(f"{where} is for another optimiser than {type(learner.optimizer).__name__}")
    groups = saved.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(live["param_groups"]):
        raise CheckpointError(f"{where} has {len(groups or [])} optimiser param groups, expected {len(live['param_groups'])}")
    param_groups = []
    for group, live_group in zip(groups, live["param_groups"]):
        if not isinstance(group, dict) or group.get("params") != live_group["params"]:
            raise CheckpointError(f"{where} has optimiser param groups over other parameters")
        numbers = [v for value in group.values() for v in (value if isinstance(value, list) else [value])]
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            raise CheckpointError(f"{where} has NaN or infinite optimiser hyper-parameters")
        # JSON turned tuples (Adam's betas) into lists; give them back the live type.
        param_groups.append(
            {k: tuple(v) if isinstance(live_group.get(k), tuple) and isinstance(v, list) else v for k, v in group.items()}
        )
    params = [p for group in learner.optimizer.param_groups for p in group["params"]]
    scalars = saved.get("scalars")
    if not isinstance(scalars, dict):
        raise CheckpointError(f"{where} has bad optimiser metadata")
    state: dict[int, dict[str, Any]] = {}
    for name in arrays:
        if not name.startswith("optim/"):
            continue
        parts = name.split("/")
        if len(parts) != 3 or not parts[1].isdigit() or int(parts[1]) >= len(params):
            raise CheckpointError(f"{where} has a stray optimiser entry {name!r}")
        index, key = int(parts[1]), parts[2]
        param = params[index]
        array = arrays[name]
        if array.ndim:
            like = param
        elif array.dtype.name in ("float32", "float64"):
            # A 0-d entry (Adam's step) is a float counter, not shaped or typed like its parameter.
            like = torch.zeros((), dtype=getattr(torch, array.dtype.name))
        else:
            raise CheckpointError(f"{where}: {name} is a scalar of dtype {array.dtype}, expected a float")
        state.setdefault(index, {})[key] = _checked(array, name, like, where)
    for index, values in scalars.items():
        if not index.isdigit() or int(index) >= len(params) or not isinstance(values, dict):
            raise CheckpointError(f"{where} has a stray optimiser entry {index!r}")
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": param_groups}
