"""What every run starts from, whatever its transport: the data set, the scenario's workload, the
seed's shared base model and the request batches each node is sent, batch by batch.

Both transports draw the same batches for the same scenario and seed: node i's stream is seeded
``seed * 1000 + i`` over the pool left after pre-training, and which helper batches carry labels
is one seeded draw per batch and helper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from agent.models import build_model
from edge_sim.scenario import Scenario
from edge_sim.workloads import BatchStream, Workload, introduction_workload, split_pool


class LabelledData(NamedTuple):
    x: np.ndarray
    y: np.ndarray
    num_classes: int


def load_dataset(name: str) -> LabelledData:
    """A scenario's ``dataset``: float32 inputs, int64 labels."""
    if name == "fashion_mnist":
        from edge_sim.datasets.images import load_fashion_mnist

        x, y = load_fashion_mnist(split="train")
        return LabelledData(x.astype(np.float32), y.astype(np.int64), 10)
    if name == "mnist_5k":
        from edge_sim.datasets.images import load_mnist_5k

        x, y = load_mnist_5k()
        return LabelledData(x.astype(np.float32), y.astype(np.int64), 10)
    from edge_sim.datasets.synthetic import make_synthetic_nslkdd

    x, y = make_synthetic_nslkdd(60_000, seed=0)
    return LabelledData(x.astype(np.float32), y.astype(np.int64), 5)


def scenario_workload(scn: Scenario, seed: int = 0) -> Workload:
    """The scenario's workload in ``seed``'s run (the seed matters only for ``new_classes = "seeded"``)."""
    return introduction_workload(
        helpers=scn.helpers, kind=scn.workload, num_classes=scn.num_classes, initial=scn.initial_classes,
        drift_at=scn.drift_at, new_share=scn.new_share, non_overlap_from=scn.non_overlap_from,
        wrong_helper=scn.nodes - 1 if scn.wrong_helper else None, new_classes=scn.new_classes_for(seed),
    )


def pretrain_base(
    arch: str, x: np.ndarray, y: np.ndarray, *, num_classes: int, epochs: int, seed: int
) -> dict[str, torch.Tensor]:
    """The one base model every node starts from (the paper fine-tunes one model and deploys it)."""
    model = build_model(arch, num_classes, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(yt), generator=gen)
        for start in range(0, len(order), 64):
            idx = order[start : start + 64]
            opt.zero_grad()
            F.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@dataclass(frozen=True)
class SeedInputs:
    """One seed of a scenario: the data, the shared base model, and the rows left for the streams."""

    seed: int
    data: LabelledData
    base: dict[str, torch.Tensor]
    rest: np.ndarray


def prepare_seed(scn: Scenario, seed: int, data: LabelledData) -> SeedInputs:
    """The seed's base model, pre-trained on the target's initial classes, and the stream pool."""
    workload = scenario_workload(scn, seed)
    pre, rest = split_pool(data.y, holdout_classes=workload.target_classes, holdout=scn.pretrain_samples, seed=seed)
    base = pretrain_base(scn.arch, data.x[pre], data.y[pre], num_classes=scn.num_classes, epochs=scn.pretrain_epochs, seed=seed)
    return SeedInputs(seed, data, base, rest)


class Request(NamedTuple):
    """One node's request batch: inputs, the true labels, and whether the node is sent them."""

    x: np.ndarray
    y: np.ndarray
    labelled: bool


class RequestFeed:
    """Every node's request batches of one run (node 0 the target), batch by batch."""

    def __init__(self, scn: Scenario, seed: int, data: LabelledData, rest: np.ndarray) -> None:
        self.workload = scenario_workload(scn, seed)
        self._streams = [BatchStream(data.x, data.y, indices=rest, seed=seed * 1000 + i) for i in range(scn.nodes)]
        self._label_draw = np.random.default_rng(seed + 7919)
        self._batch_size = scn.batch_size
        self._label_fraction = scn.helper_label_fraction

    def batch(self, t: int) -> list[Request]:
        """Batch ``t`` of every node, in node order."""
        out = []
        for i, stream in enumerate(self._streams):
            x, y = stream.batch(self.workload.mix(i, t), self._batch_size)
            # A weak helper sees as many requests but learns from only some of them.
            labelled = i == 0 or self._label_draw.random() < self._label_fraction
            out.append(Request(x, y, labelled))
        return out
