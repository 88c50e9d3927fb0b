"""The FedAvg baseline's pure pieces (ARCHITECTURE.md §7): who takes part in a round, when a
round is due, model <-> wire messages, and the sample-weighted average. No MQTT here: the agent
daemon and `edge_sim.aggregator` wire them to `fl/{job}/update/{id}` and `fl/{job}/global`.

A round `r` falls on the node's batch `(r + 1) * every - 1`. Its participants are `per_round` of
the job's `members`, drawn by a seeded hash, so every node and the aggregator compute the same set
without talking. A model travels as what the node learns (`agent.models.learnt_state`): its
trainable parameters, each once (a tied one under its first name), and its buffers outside frozen
modules, so a node that adopts the global model adopts the batch-norm statistics too. Frozen
parameters (and the buffers of frozen modules) are the shared base's on every node by
construction: they are never sent, and a global model that names one is refused. Buffers are
averaged as the parameters are when they are floats (running means and variances, weighted by
samples), and take the largest value when they are integers (a batch-norm `num_batches_tracked`,
a count of steps).

>>> cfg = FlConfig(job="j1", every=5, members=["a", "b", "c"], per_round=2)
>>> [is_round_batch(cfg, i) for i in (3, 4, 9)]
[None, 0, 1]
>>> participants(cfg, 0) == participants(FlConfig(**cfg.model_dump()), 0)
True
>>> len(participants(cfg, 0))
2
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator
from torch import nn

from agent.errors import ClueError
from agent.models import learnt_state, trainable_params
from broker.wire import ArrayPayload, GlobalModel, ModelUpdate, NamedArray

_Id = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class FlRejected(ClueError, ValueError):
    """A model update or global model was refused (names, shapes, dtypes or values do not fit)."""


class FlConfig(BaseModel):
    """One FedAvg job, the same on every node and on the aggregator."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job: _Id = Field(description="job id: the `fl/{job}/…` topics")
    every: int = Field(ge=1, description="f: a round every `every` batches of each node")
    members: tuple[_Id, ...] = Field(min_length=1, description="the n node ids of the job")
    per_round: int = Field(ge=1, description="n′: members that send their model in each round")
    seed: int = Field(0, description="seed of the participant draw")

    @model_validator(mode="after")
    def _check(self) -> "FlConfig":
        if len(set(self.members)) != len(self.members):
            raise ValueError("members must be distinct")
        if self.per_round > len(self.members):
            raise ValueError(f"per_round ({self.per_round}) exceeds the {len(self.members)} members")
        return self


def participants(cfg: FlConfig, round: int) -> list[str]:
    """The `per_round` members taking part in `round`, in the order of `cfg.members`.

    Members are ranked by `sha256(f"{seed}:{round}:{id}")` and the first `per_round` are taken:
    a fresh, uniform-looking draw per round that needs no shared random state.
    """
    if round < 0:
        raise ValueError(f"round must be >= 0, got {round}")
    ranked = sorted(cfg.members, key=lambda m: hashlib.sha256(f"{cfg.seed}:{round}:{m}".encode()).digest())
    chosen = set(ranked[: cfg.per_round])
    return [m for m in cfg.members if m in chosen]


def is_round_batch(cfg: FlConfig, batch_index: int) -> int | None:
    """The round due after batch `batch_index` (0-based), or None when no round falls on it."""
    if batch_index < 0:
        raise ValueError(f"batch_index must be >= 0, got {batch_index}")
    done = batch_index + 1
    return done // cfg.every - 1 if done % cfg.every == 0 else None


# --- models <-> messages ---------------------------------------------------------------------


def model_to_update(model: nn.Module, *, job: str, round: int, node_id: str, samples: int) -> ModelUpdate:
    """A node's `ModelUpdate`: what it learns (`learnt_state`); `samples` weighs it in the average."""
    _check_param_dtypes(model)
    return ModelUpdate(job=job, round=round, node_id=node_id, tensors=_named(_state_arrays(model)), samples=samples)


def global_from_tensors(tensors: Mapping[str, np.ndarray], *, job: str, round: int, samples: int) -> GlobalModel:
    """The `GlobalModel` of a round from averaged arrays (what `fedavg` returns)."""
    return GlobalModel(job=job, round=round, tensors=_named(tensors), samples=samples)


def apply_global(model: nn.Module, msg: GlobalModel) -> None:
    """Load a global model into `model`, all or nothing.

    The message must hold exactly the names `model_to_update` sends (no frozen tensor among them),
    each with the local shape and dtype (parameters float32, buffers their own dtype) and finite
    values; otherwise `FlRejected` is raised and the model is unchanged.
    """
    _check_param_dtypes(model)
    live = learnt_state(model, keep_vars=True)
    local = {name: t.detach() for name, t in live.items()}
    arrays = {t.name: t.array.to_numpy() for t in msg.tensors}
    frozen = _frozen_names(model, live)
    named = sorted(frozen & arrays.keys())
    if named:
        raise FlRejected(f"global model: names frozen tensors {named[:5]}, which never leave a node")
    _check_names(arrays.keys(), local.keys(), "global model")
    state: dict[str, torch.Tensor] = {}
    for name, ref in local.items():
        arr = arrays[name]
        want = _np_name(ref)
        if arr.dtype.name != want:
            raise FlRejected(f"global model: {name} is {arr.dtype.name}, the model holds {want}")
        if tuple(arr.shape) != tuple(ref.shape):
            raise FlRejected(f"global model: {name} has shape {tuple(arr.shape)}, the model needs {tuple(ref.shape)}")
        # The wire checks finiteness on validation; a message built without it must not slip by.
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise FlRejected(f"global model: {name} holds NaN or infinite values")
        state[name] = torch.from_numpy(np.array(arr, dtype=arr.dtype.newbyteorder("="), copy=True))
    # Not strict: the frozen tensors and a tied tensor's other names are the model's own already.
    model.load_state_dict(state, strict=False)


# --- the average -----------------------------------------------------------------------------


def fedavg(updates: Sequence[ModelUpdate]) -> dict[str, np.ndarray]:
    """The sample-weighted mean of the updates' tensors, in the first update's name order.

    Float tensors: `sum(samples_i * x_i) / sum(samples_i)`, accumulated in float64 and returned
    in the input dtype; when every `samples` is 0, the plain mean. Integer tensors (a batch-norm
    `num_batches_tracked`) take the maximum: a count of steps, not a quantity to average.
    All updates must share job, round, names, shapes and dtypes, else `FlRejected`.
    """
    if not updates:
        raise FlRejected("no updates to average")
    first = updates[0]
    for u in updates[1:]:
        if (u.job, u.round) != (first.job, first.round):
            raise FlRejected(
                f"updates of different rounds: {u.node_id} sent {u.job}/{u.round}, {first.node_id} {first.job}/{first.round}"
            )
    tables = [{t.name: t.array.to_numpy() for t in u.tensors} for u in updates]
    ref = tables[0]
    for u, table in zip(updates[1:], tables[1:]):
        _check_names(table.keys(), ref.keys(), f"update of {u.node_id}")
        for name, arr in table.items():
            if arr.dtype != ref[name].dtype or arr.shape != ref[name].shape:
                raise FlRejected(
                    f"update of {u.node_id}: {name} is {arr.dtype.name}{list(arr.shape)}, "
                    f"{first.node_id} sent {ref[name].dtype.name}{list(ref[name].shape)}"
                )
    total = sum(u.samples for u in updates)
    weights = [u.samples / total for u in updates] if total else [1.0 / len(updates)] * len(updates)
    out: dict[str, np.ndarray] = {}
    for t in first.tensors:
        arrs = [table[t.name] for table in tables]
        if arrs[0].dtype.kind == "f":
            acc = np.zeros(arrs[0].shape, dtype=np.float64)
            for w, arr in zip(weights, arrs):
                acc += arr.astype(np.float64) * w
            out[t.name] = acc.astype(arrs[0].dtype.newbyteorder("="))
        else:
            out[t.name] = np.asarray(np.stack(arrs).max(axis=0), dtype=arrs[0].dtype.newbyteorder("="))
    return out


def layout(msg: ModelUpdate | GlobalModel) -> dict[str, tuple[str, tuple[int, ...]]]:
    """`{name: (dtype, shape)}` of a message's tensors: what two updates must share to be averaged."""
    return {t.name: (t.array.dtype, tuple(t.array.shape)) for t in msg.tensors}


# --- helpers ---------------------------------------------------------------------------------


def _state_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    out = {}
    for name, t in learnt_state(model).items():
        arr = t.detach().to("cpu").contiguous().numpy()
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise FlRejected(f"model: {name} holds NaN or infinite values")
        out[name] = arr
    return out


def _named(tensors: Mapping[str, np.ndarray]) -> list[NamedArray]:
    return [NamedArray(name=name, array=_payload(arr)) for name, arr in tensors.items()]


def _payload(arr: np.ndarray) -> ArrayPayload:
    # Not `ArrayPayload.from_numpy`: its `np.ascontiguousarray` turns a 0-d array (batch-norm's
    # `num_batches_tracked`) into shape [1], which would then not fit the model it came from.
    arr = np.asarray(arr)
    little = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    return ArrayPayload(dtype=arr.dtype.name, shape=list(arr.shape), data=little.tobytes())


def _frozen_names(model: nn.Module, live: Mapping[str, torch.Tensor]) -> set[str]:
    """The `state_dict` names of tensors that never travel (a second name of a tied one does not count)."""
    sent = {id(t) for t in live.values()}
    return {name for name, t in model.state_dict(keep_vars=True).items() if id(t) not in sent}


def _check_param_dtypes(model: nn.Module) -> None:
    for name, p in trainable_params(model):
        if p.dtype != torch.float32:
            raise FlRejected(f"model: parameter {name} is {p.dtype}; FedAvg sends float32 parameters")


def _check_names(got: Iterable[str], want: Iterable[str], what: str) -> None:
    got_set, want_set = set(got), set(want)
    if got_set != want_set:
        missing, extra = sorted(want_set - got_set), sorted(got_set - want_set)
        raise FlRejected(f"{what}: tensors do not match (missing {missing[:5]}, unexpected {extra[:5]})")


def _np_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


__all__ = [
    "FlConfig",
    "FlRejected",
    "apply_global",
    "fedavg",
    "global_from_tensors",
    "is_round_batch",
    "layout",
    "model_to_update",
    "participants",
]
