"""What every run starts from, whatever its transport: the data set, the scenario's workload, the
seed's shared base model and the request batches each node is sent, batch by batch.

Every model of a run is built here (`scenario_model`), from the scenario's spec, built-in or not:
nothing downstream knows a built-in from the user's own model.

Both transports draw the same batches for the same scenario and seed: node i's stream is seeded
``seed * 1000 + i`` over the pool left after pre-training, and which helper batches carry labels
is one seeded draw per batch and helper.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from agent.config import LearnerConfig
from agent.errors import ConfigError
from agent.learner import Learner
from agent.models import ModelError, build_from_spec
from edge_sim.datasets.sources import LabelledData, describe, load_dataset
from edge_sim.scenario import Scenario
from edge_sim.workloads import BatchStream, Workload, introduction_workload, split_pool


def scenario_data(scn: Scenario) -> LabelledData:
    """The scenario's data set, its samples reshaped to the model's ``input_shape``.

    Raises ConfigError naming the file when it is missing or cannot be used (see
    ``load_dataset``), when its classes do not fit ``new_classes`` or ``initial_classes``, its
    samples hold more or fewer values than the model takes, or its values lie outside the
    learner's ``input_range`` (every batch would be refused).
    """
    where = describe(scn.dataset)
    try:
        data = load_dataset(scn.dataset)
    except (OSError, ValueError) as exc:  # their messages name the file
        raise ConfigError(f"{scn.name}: dataset: {exc}") from exc
    try:
        scn.check_classes(data.num_classes)
    except ValueError as exc:
        raise ConfigError(f"{scn.name}: dataset {where}: {exc}") from exc
    shape = scn.model_spec().sample_shape()
    if math.prod(shape) != math.prod(data.x.shape[1:]):
        raise ConfigError(
            f"{scn.name}: dataset {where} has samples of shape {list(data.x.shape[1:])} ({math.prod(data.x.shape[1:])} values), "
            f"but the model {scn.model!r} takes input_shape {list(shape)} ({math.prod(shape)} values)"
        )
    low, high = LearnerConfig.model_validate(scn.learner).input_range
    lowest, highest = float(data.x.min()), float(data.x.max())
    if lowest < low or highest > high:
        raise ConfigError(
            f"{scn.name}: dataset {where} spans [{lowest:.4g}, {highest:.4g}], outside the learner's input_range [{low:g}, {high:g}] "
            "(every batch would be refused): scale the data (the table's scale) or set [learner] input_range"
        )
    return LabelledData(data.x.reshape(len(data.x), *shape), data.y, data.num_classes)


def scenario_model(scn: Scenario, num_classes: int, *, seed: int | None = None) -> nn.Module:
    """A fresh model of the scenario's spec (``seed``: as ``build_from_spec``); ConfigError when it cannot be built."""
    for folder in reversed(scn.python_path):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    try:
        return build_from_spec(scn.model_spec(), num_classes, seed=seed)
    except ModelError as exc:
        raise ConfigError(f"{scn.name}: {exc}") from exc


def scenario_workload(scn: Scenario, num_classes: int, seed: int = 0) -> Workload:
    """The scenario's workload over ``num_classes`` classes in ``seed``'s run (the seed matters only for ``new_classes = "seeded"``)."""
    return introduction_workload(
        helpers=scn.helpers, kind=scn.workload, num_classes=num_classes, initial=scn.initial_classes,
        drift_at=scn.drift_at, new_share=scn.new_share, non_overlap_from=scn.non_overlap_from,
        wrong_helper=scn.nodes - 1 if scn.wrong_helper else None, new_classes=scn.new_classes_for(seed, num_classes),
    )


def pretrain_base(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, seed: int) -> dict[str, torch.Tensor]:
    """Train ``model``, freshly built, into the one base model every node starts from (the paper
    fine-tunes one model and deploys it); returns its state."""
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
    #: The rows the base model was pre-trained on (an int8 backbone is calibrated on some of them).
    pre: np.ndarray | None = None


def prepare_seed(scn: Scenario, seed: int, data: LabelledData) -> SeedInputs:
    """The seed's base model, pre-trained on the target's initial classes, and the stream pool."""
    workload = scenario_workload(scn, data.num_classes, seed)
    pre, rest = split_pool(data.y, holdout_classes=workload.target_classes, holdout=scn.pretrain_samples, seed=seed)
    model = scenario_model(scn, data.num_classes, seed=seed)
    if scn.backbone is not None:
        # Split serving stands for a backbone pre-trained elsewhere: the whole base trains, then the nodes freeze it.
        for p in model.parameters():
            p.requires_grad_(True)
    base = pretrain_base(model, data.x[pre], data.y[pre], epochs=scn.pretrain_epochs, seed=seed)
    return SeedInputs(seed, data, base, rest, pre)


class Request(NamedTuple):
    """One node's request batch: inputs, the true labels, and whether the node is sent them."""

    x: np.ndarray
    y: np.ndarray
    labelled: bool


class LateLabels(NamedTuple):
    """Labels for some samples of a batch a node was served earlier (or with it, for some samples only)."""

    node: int
    batch: int
    y: np.ndarray
    indices: np.ndarray


class LabelPlan:
    """When each labelled batch's labels come (``label_delay`` batches after it) and for which
    samples (a ``label_fraction`` of them, drawn per batch); with no delay and every sample, they
    ride in the batch as always."""

    def __init__(self, scn: Scenario, seed: int) -> None:
        self.delay = scn.label_delay
        self.fraction = scn.label_fraction
        self._draw = np.random.default_rng(seed + 104729)
        self._due: dict[int, list[LateLabels]] = {}

    @property
    def inline(self) -> bool:
        """Every labelled batch carries all its labels: the plan changes nothing."""
        return self.delay == 0 and self.fraction >= 1.0

    def plan(self, t: int, requests: Sequence[Request]) -> list[LateLabels]:
        """Record batch ``t``; returns the labels that ride in it (some samples, no delay): at most one per node."""
        now = []
        for node, request in enumerate(requests):
            if not request.labelled:
                continue
            n = len(request.y)
            count = max(1, int(round(self.fraction * n)))
            indices = np.sort(self._draw.choice(n, size=count, replace=False)) if count < n else np.arange(n)
            labels = LateLabels(node, t, request.y[indices], indices)
            if self.delay == 0:
                now.append(labels)
            else:
                self._due.setdefault(t + self.delay, []).append(labels)
        return now

    def due(self, t: int) -> list[LateLabels]:
        """Labels that come just before batch ``t`` is served."""
        return self._due.pop(t, [])


class RequestFeed:
    """Every node's request batches of one run (node 0 the target), batch by batch."""

    def __init__(self, scn: Scenario, seed: int, data: LabelledData, rest: np.ndarray) -> None:
        self.workload = scenario_workload(scn, data.num_classes, seed)
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


def node_learner(scn: Scenario, config: LearnerConfig, inputs: SeedInputs, seed: int) -> Learner:
    """One node's learner as the in-process fleet builds it: the seed's base weights, the scenario's model."""
    num_classes = inputs.data.num_classes
    model = scenario_model(scn, num_classes)
    model.load_state_dict(copy.deepcopy(inputs.base))
    return Learner(
        model, num_classes=num_classes, config=config, base_state=inputs.base, seed=seed, input_shape=scn.model_spec().sample_shape()
    )
