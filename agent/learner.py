"""The learner: the one place where predict → retrain → drift → help → boost → discard happens.

The in-process experiment calls it directly; the daemon wires the same object to MQTT. It owns the
target model, its optimiser, the class histograms, the reservoir (or sensitivity map) it answers
helpers' requests from, the drift detector and the helper pool. It never touches the network and
never decides whom to ask: it reports a drift (the classes behind it, the error before it) and the
helpers it dropped as useless, and `agent.kt.coordinator.HelpCoordinator` runs the transfer; a KT
blob is handed back in as bytes.

The model's frozen parameters (``requires_grad`` False: `agent.models.freeze_untrainable`) are the
shared base's and stay so: the optimiser, the sensitivity picker, the blobs this node sends and
accepts, and a live branch all take the trainable ones only (`agent.models.trainable_params`), and
frozen modules run in eval mode while training (`agent.models.train_mode`).
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from agent.config import LearnerConfig, patched
from agent.drift import DriftDetector, classes_to_request
from agent.ensemble import EnsembleOperator
from agent.errors import KtRejected
from agent.kt import booster, codec, vetting
from agent.kt.booster import KnowledgeUse
from agent.kt.coordinator import DriftReport, DroppedHelper, PoolState
from agent.kt.picker import PositionChoice, SensitivitySource
from agent.kt.pool import HelperPool, PooledHelper
from agent.kt.selection import significant_params
from agent.kt.sensitivity import Reservoir
from agent.kt.significant import SignificantParams
from agent.models import arch_id as compute_arch_id
from agent.models import learnt_state, param_shapes, train_mode, trainable_params
from agent.models import lineage as compute_lineage
from agent.optim import Adam

#: Promotions remembered for labels that come later (a batch served before more of them learns the target only).
_PROMOTIONS_KEPT = 64
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
# Batches before the drift window whose mean target error is the level a helper must restore.
_BASELINE_BATCHES = 10
_ERROR_HISTORY = 64


@dataclass
class BatchResult:
    """What one request batch produced."""

    batch_index: int
    y_hat: torch.Tensor
    served_error: float | None = None
    target_error: float | None = None
    class_errors: dict[int, float] = field(default_factory=dict)
    helpers: tuple[str, ...] = ()
    drift: bool = False
    #: The drift this batch showed and the classes behind it (for the help coordinator).
    drift_report: DriftReport | None = None
    discarded: tuple[str, ...] = ()
    #: Live branches promoted into the target after this batch (the old target took their place in the pool).
    promoted: tuple[str, ...] = ()
    #: Helpers dropped as no better than the target on their own classes (their ids are in ``discarded`` too).
    dropped: tuple[DroppedHelper, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)
    #: Why the training step was rolled back (None: it was taken, or the batch had no labels).
    train_refused: str | None = None

    @property
    def learnt(self) -> bool:
        """The batch was labelled and its training step taken: drift and helpers were checked."""
        return self.target_error is not None and self.train_refused is None


@dataclass
class Served:
    """One served batch as ``Learner.learn`` needs it when its labels come: the inputs, what the
    ensemble served, and what the target and every pooled model predicted (by member id)."""

    result: BatchResult
    x: torch.Tensor
    served_p: torch.Tensor
    target_p: torch.Tensor
    member_ps: dict[str, torch.Tensor]
    #: The target's version (``Learner.model_version``) that served the batch.
    model_version: int
    #: Promotions (target ⇄ live branch swaps) before it was served: ``learn`` maps later ones back.
    promotions: int = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors kept (the inputs are shared with the reservoir while it holds them)."""
        tensors = [self.x, self.served_p, self.target_p, self.result.y_hat, *self.member_ps.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


class Member(NamedTuple):
    """One model the operator combines beside the target: a pooled helper, or its live branch."""

    member_id: str
    model: nn.Module
    classes: tuple[int, ...]
    helper: PooledHelper
    live: bool


@dataclass(frozen=True)
class Installed:
    """What accepting a KT blob did."""

    helper_id: str | None
    classes: tuple[int, ...]
    count: int
    evicted: tuple[str, ...]
    seconds: float


class Learner:
    """Online learner of one node, with CLUE's knowledge transfer as helper and as target.

    ``model`` holds the base weights (``base_state``, when given, is what it was loaded from and
    names the lineage); its frozen parameters must equal the base's, and at least one parameter
    must be trainable. Raises ValueError otherwise.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        num_classes: int,
        config: LearnerConfig | None = None,
        base_state: Mapping[str, torch.Tensor] | None = None,
        device: str | torch.device = "cpu",
        seed: int = 0,
        input_shape: tuple[int, ...] | None = None,
        backbone_id: str | None = None,
    ) -> None:
        self.device = torch.device(device)
        #: The frozen backbone in front of ``model`` (split serving, `agent.backbone`): its inputs are
        #: the backbone's features, whose range the backbone's own check does not bound.
        self.backbone_id = backbone_id
        #: One sample's shape (None: any the model takes).
        self.input_shape = input_shape
        self.model = model.to(self.device)
        self.num_classes = num_classes
        self.config = config or LearnerConfig()
        self.arch_id = compute_arch_id(model)
        base = {k: v.detach().to("cpu").clone() for k, v in (base_state or model.state_dict()).items()}
        self.lineage = compute_lineage(base)
        if backbone_id is not None:
            # Heads behind different backbones must never exchange weights.
            self.arch_id = hashlib.sha256(f"{self.arch_id} behind backbone {backbone_id}".encode()).hexdigest()[:16]
            self.lineage = hashlib.sha256(f"{self.lineage} behind backbone {backbone_id}".encode()).hexdigest()[:16]
        _check_frozen(model, base)
        self._base_params = {name: base[name] for name, _ in trainable_params(model)}
        self._shapes = param_shapes(model)
        self._rng = torch.Generator().manual_seed(seed)
        self._helper_ids = itertools.count()
        self.batch_index = 0
        #: Training steps taken by the target since start-up (and models it adopted): which version served a batch.
        self.model_version = 0
        #: The live branch (member id) each promotion swapped with the target, the latest last, and how many there were.
        self._promoted_members: deque[str] = deque(maxlen=_PROMOTIONS_KEPT)
        self._promotions = 0
        #: The last request batch and its labels (None if unlabelled): a new helper is tried on it.
        self._last_batch: tuple[torch.Tensor, torch.Tensor | None] | None = None
        #: What each frozen pooled helper predicted on that batch, by member id.
        self._last_frozen_ps: dict[str, torch.Tensor] = {}
        self.longrun_hist = np.zeros(num_classes, dtype=np.int64)
        # Another engine (onnxruntime) may serve the probabilities; the torch model stays the truth.
        self.inference: Callable[[Learner, torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]] | None = None
        self._build_components()

    # -- configuration ---------------------------------------------------------------------------

    def _build_components(self) -> None:
        cfg = self.config
        self.optimizer = Adam([p for _, p in trainable_params(self.model)], lr=cfg.lr)
        self.detector: DriftDetector = cfg.drift.build(num_classes=self.num_classes)
        self.operator: EnsembleOperator = cfg.operator.build()
        self.pool = HelperPool(cfg.discard.build(), max_size=cfg.pool_max, window=cfg.discard.window)
        self.reservoir = Reservoir(cfg.reservoir_batches)
        self.sensitivity_source: SensitivitySource = cfg.picker.build(self.model, self.num_classes)
        self.position_choice: PositionChoice = cfg.selection.build()
        self.knowledge_use: KnowledgeUse = cfg.kt_apply.build()
        self._recent_hist: deque[np.ndarray] = deque(maxlen=cfg.history_window)
        self._recent_class_err: deque[tuple[np.ndarray, np.ndarray]] = deque(maxlen=cfg.history_window)
        self._target_errors: deque[float] = deque(maxlen=_ERROR_HISTORY)
        self._served_errors: deque[float] = deque(maxlen=_ERROR_HISTORY)

    def apply_config(self, values: Mapping[str, Any]) -> LearnerConfig:
        """Validate ``values`` against the whole config and apply them atomically, between batches.

        Raises ConfigError (old config kept) when anything is invalid. Components whose settings
        changed are rebuilt; the model, its histogram and the pooled helpers are kept.
        """
        new = patched(self.config, dict(values))
        old = self.config
        self.config = new
        if new.lr != old.lr:
            for group in self.optimizer.param_groups:
                group["lr"] = new.lr
        if new.drift != old.drift:
            self.detector = new.drift.build(num_classes=self.num_classes)
        if new.operator != old.operator:
            self.operator = new.operator.build()
        if new.discard != old.discard or new.pool_max != old.pool_max:
            helpers = list(self.pool)
            self.pool = HelperPool(new.discard.build(), max_size=new.pool_max, window=new.discard.window)
            for h in sorted(helpers, key=lambda h: h.installed_at)[-new.pool_max :]:
                self.pool.add(h)
        if new.reservoir_batches != old.reservoir_batches:
            self.reservoir.resize(new.reservoir_batches)
        if new.picker != old.picker:
            self.sensitivity_source = new.picker.build(self.model, self.num_classes)
        if new.selection != old.selection:
            self.position_choice = new.selection.build()
        if new.kt_apply != old.kt_apply:
            self.knowledge_use = new.kt_apply.build()
        if new.history_window != old.history_window:
            self._recent_hist = deque(self._recent_hist, maxlen=new.history_window)
            self._recent_class_err = deque(self._recent_class_err, maxlen=new.history_window)
        return new

    # -- serving and learning --------------------------------------------------------------------

    @torch.no_grad()
    def _probabilities(
        self, x: torch.Tensor, known: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The target's and every member's probabilities on ``x``; ``known``: members' already
        computed on the same ``x`` by torch (by member id), used as they are."""
        if self.inference is not None:
            return self.inference(self, x)
        known = known or {}
        self.model.eval()
        target = torch.softmax(self.model(x), dim=1)
        helpers = [known[m.member_id] if m.member_id in known else torch.softmax(m.model.eval()(x), dim=1) for m in self.members()]
        return target, helpers

    def members(self) -> list[Member]:
        """What the operator combines beside the target, in order: each pooled helper, then its live branch."""
        out = []
        for h in self.pool:
            out.append(Member(h.helper_id, h.model, h.classes, h, False))
            if h.branch is not None:
                out.append(Member(f"{h.helper_id}+", h.branch, h.classes, h, True))
        return out

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Served class probabilities (N, C): the operator over the target and every pooled helper."""
        x = x.to(self.device)
        target, helpers = self._probabilities(x)
        members = self.members()
        return self.operator.combine(target, helpers, [m.classes for m in members], [m.member_id for m in members])

    def process_batch(self, x: torch.Tensor, y: torch.Tensor | None = None) -> BatchResult:
        """Serve one request batch and, when it is labelled, learn from it.

        Order (ARCHITECTURE §3): predict with the ensemble, retrain the target, update the
        histograms and the reservoir, check drift, and check whether helpers can go.
        """
        if y is not None:
            self.check_labels(x.shape[0], y.to(self.device))
        served = self.serve(x)
        if y is None:
            return served.result
        return self.learn(served, y)

    def serve(self, x: torch.Tensor) -> Served:
        """Predict one request batch with the ensemble; what it keeps lets ``learn`` take labels later.

        Raises ValueError, changing nothing, for inputs the model must not see.
        """
        t0 = time.perf_counter()
        x = x.to(self.device)
        self.check_inputs(x)
        # Predict before touching any state: an input the model cannot take fails here, changing nothing.
        target_p, helper_ps = self._probabilities(x)
        index = self.batch_index
        self.batch_index += 1
        members = self.members()
        classes, ids = [m.classes for m in members], [m.member_id for m in members]
        served_p = self.operator.combine(target_p, helper_ps, classes, ids)
        y_hat = served_p.argmax(dim=1)
        result = BatchResult(batch_index=index, y_hat=y_hat.cpu(), helpers=tuple(h.helper_id for h in self.pool))
        result.timings["predict"] = time.perf_counter() - t0
        self.reservoir.add(x)
        self._last_batch = (x, None)
        self._last_frozen_ps = {}
        return Served(
            result=result,
            x=x,
            served_p=served_p,
            target_p=target_p,
            member_ps=dict(zip(ids, helper_ps)),
            model_version=self.model_version,
            promotions=self._promotions,
        )

    def check_labels(self, n: int, y: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor | None:
        """Raise ValueError, changing nothing, for labels that do not fit a batch of ``n`` samples;
        returns the sample indices they label (None: all, in order)."""
        if y.ndim != 1 or y.dtype not in _INT_DTYPES:
            raise ValueError(f"labels must be int of shape ({n},) or name their samples by index, got {y.dtype} {tuple(y.shape)}")
        if indices is None:
            if y.shape[0] != n:
                raise ValueError(f"labels must be int of shape ({n},) or name their samples by index, got {y.shape[0]} labels")
        else:
            if indices.ndim != 1 or indices.dtype not in _INT_DTYPES:
                raise ValueError(f"indices must be a 1-d integer array, got {indices.dtype} {tuple(indices.shape)}")
            if indices.shape[0] != y.shape[0]:
                raise ValueError(f"{y.shape[0]} labels for {indices.shape[0]} indices")
            if y.shape[0] == 0:
                raise ValueError("no labels")
            if int(indices.min()) < 0 or int(indices.max()) >= n:
                raise ValueError(f"indices outside [0, {n})")
            if torch.unique(indices).shape[0] != indices.shape[0]:
                raise ValueError("an index is given twice")
        if y.shape[0] and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(f"labels outside [0, {self.num_classes})")
        if indices is None:
            return None
        order = indices.long().to(self.device)
        return None if order.shape[0] == n and bool((order == torch.arange(n, device=self.device)).all()) else order

    def learn(self, served: Served, y: torch.Tensor, indices: torch.Tensor | None = None) -> BatchResult:
        """Learn from the labels of a batch served earlier (all its samples, or those ``indices`` names).

        Exactly what the labels would have done had they come with the batch: the errors, the
        operator's trust and each helper's judgement use what was served (helpers pooled since
        did not serve it; helpers gone since are skipped), then the target and every live branch
        train on the samples. Raises ValueError, changing nothing, for labels that do not fit.
        """
        t1 = time.perf_counter()
        order = self.check_labels(served.x.shape[0], y, indices)
        y = y.to(self.device).long()
        index = served.result.batch_index
        result = BatchResult(
            batch_index=index,
            y_hat=served.result.y_hat if order is None else served.result.y_hat[order.cpu()],
            helpers=served.result.helpers,
        )
        result.timings["predict"] = served.result.timings["predict"]

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t if order is None else t[order]

        x, y_hat = pick(served.x), pick(served.served_p).argmax(dim=1)
        served_target_p, member_ps = self._as_now(served)
        target_p = pick(served_target_p)
        members = [m for m in self.members() if m.member_id in member_ps]
        helper_ps = [pick(member_ps[m.member_id]) for m in members]
        classes, ids = [m.classes for m in members], [m.member_id for m in members]
        self._last_batch = (x, y)
        # A frozen helper's outputs on these samples stay what they were: a new helper's trust
        # evidence (``_learn_trust_on_last_batch``) reuses them rather than running it again.
        self._last_frozen_ps = {m.member_id: p for m, p in zip(members, helper_ps) if not m.live}
        wrong = (y_hat != y).float()
        target_wrong = (target_p.argmax(dim=1) != y).float()
        result.served_error = float(wrong.mean())
        result.target_error = float(target_wrong.mean())
        labels = y.cpu().numpy()
        counts = np.bincount(labels, minlength=self.num_classes)
        err_counts = np.bincount(labels, weights=wrong.cpu().numpy(), minlength=self.num_classes)
        result.class_errors = {int(c): float(err_counts[c] / counts[c]) for c in np.flatnonzero(counts)}
        for m, p in zip(members, helper_ps):
            h = m.helper
            if m.live or h.branch is None:
                h.batch_errors.append(float((p.argmax(dim=1) != y).float().mean()))
            if m.live:
                continue
            mask = torch.isin(y, torch.as_tensor(h.classes, device=self.device))
            if bool(mask.any()):
                self.pool.record_error(
                    h.helper_id,
                    float((p.argmax(dim=1)[mask] != y[mask]).float().mean()),
                    float(target_wrong[mask].mean()),
                )

        if self.operator.learns and members:
            self.operator.learn(target_p, helper_ps, classes, ids, y)
        live = [m for m in self.members() if m.live]
        refused = self._train_step(x, y)
        if refused is None:
            self.model_version += 1
            for m in live:
                _train_step(m.model, m.helper.optimizer, x, y)
        t2 = time.perf_counter()
        result.timings["train"] = t2 - t1
        if refused is not None:
            # The step was rolled back: these labels taught nothing, so they count nowhere.
            result.train_refused = refused
            return result
        if self.sensitivity_source.observes:
            self.sensitivity_source.observe(self.model, x)
            result.timings["sensitivity_map"] = time.perf_counter() - t2

        recent_longrun = self.longrun_hist.copy()
        self.longrun_hist += counts
        self._recent_hist.append(counts)
        self._recent_class_err.append((counts, err_counts))
        self._target_errors.append(result.target_error)
        self._served_errors.append(result.served_error)
        self.detector.update(result.target_error, labels)
        result.drift = self.detector.drift_detected
        if result.drift and self.knowledge_use.enabled:
            # Now, in served batches: late labels of an older batch still report the drift at this point of the stream.
            result.drift_report = self._drift_report(self.batch_index - 1, recent_longrun)
        rolling = self._target_rolling_error()
        # Helpers age in served batches, whichever batch these labels belong to.
        discarded = self.pool.discard_check(batch_index=self.batch_index - 1, target_rolling_error=rolling)
        if self.config.drop_unhelpful:
            dropped = self.pool.drop_unhelpful()
            discarded.extend(h.helper_id for h in dropped)
            result.dropped = tuple(
                DroppedHelper(h.helper_id, h.classes, h.source, h.installed_at, h.baseline_error) for h in dropped
            )
        if self.knowledge_use.branches:
            result.promoted = self._promote()
            if self.config.discard.type == "dynamic":
                # Dynamic discard: a helper also goes once it no longer adds anything to the target.
                discarded.extend(self._drop_redundant())
        if self.operator.learns:
            self.operator.forget([m.member_id for m in self.members()])
        result.discarded = tuple(discarded)
        return result

    def _as_now(self, served: Served) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """What the target and each member predicted on ``served``, by who they are now: a live
        branch promoted since then is the target, and the old target took its member id."""
        target_p, member_ps = served.target_p, dict(served.member_ps)
        since = self._promotions - served.promotions
        if since > len(self._promoted_members):
            return target_p, {}  # too many swaps ago to tell which model made which prediction
        for member_id in list(self._promoted_members)[len(self._promoted_members) - since:]:
            if member_id in member_ps:
                target_p, member_ps[member_id] = member_ps[member_id], target_p
        return target_p, member_ps

    def _promote(self) -> tuple[str, ...]:
        """Swap the target with a live branch that was better than it over the last L batches.

        The branch's model and optimiser become the target's; the old target stays pooled in the
        branch's place (under its id, judged), as a guard for whatever the branch does worse.
        """
        window = self.pool.window
        own = list(self._target_errors)[-window:]
        if len(own) < window:
            return ()
        best = None
        for h in self.pool:
            if h.branch is not None and len(h.batch_errors) >= window:
                mean = float(np.mean(list(h.batch_errors)[-window:]))
                if mean < float(np.mean(own)) and (best is None or mean < best[0]):
                    best = (mean, h)
        if best is None:
            return ()
        h = best[1]
        assert h.branch is not None
        target_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        target_optim = _cloned_state(self.optimizer)
        self.model.load_state_dict(h.branch.state_dict())
        self.optimizer.load_state_dict(_cloned_state(h.optimizer))
        h.branch.load_state_dict(target_state)
        h.optimizer.load_state_dict(target_optim)
        branch_errors = list(h.batch_errors)
        kept = len(self._target_errors) - len(branch_errors)
        h.batch_errors = deque(list(self._target_errors)[-len(branch_errors):], maxlen=h.batch_errors.maxlen)
        self._target_errors = deque([*list(self._target_errors)[: max(0, kept)], *branch_errors], maxlen=_ERROR_HISTORY)
        h.judged = True
        self.operator.swap(f"{h.helper_id}+")
        self._promoted_members.append(f"{h.helper_id}+")
        self._promotions += 1
        self.model_version += 1
        return (h.helper_id,)

    def _drop_redundant(self) -> list[str]:
        """Drop a pooled model once the target alone was as good as the served ensemble over L batches."""
        window = self.pool.window
        own = list(self._target_errors)[-window:]
        served = list(self._served_errors)[-window:]
        ready = [h for h in self.pool if len(h.batch_errors) >= window]
        if len(own) < window or len(served) < window or not ready:
            return []
        if float(np.mean(own)) > float(np.mean(served)):
            return []
        worst = max(ready, key=lambda h: (float(np.mean(list(h.batch_errors)[-window:])), -h.installed_at))
        self.pool.remove(worst.helper_id)
        return [worst.helper_id]

    def pool_state(self) -> PoolState:
        """What the helper pool holds now (for the help coordinator)."""
        return PoolState(frozenset(self.pool.classes()), len(self.pool), self.pool.max_size)

    def check_inputs(self, x: torch.Tensor) -> None:
        """Raise ValueError, changing nothing, for a batch the model must not see or learn from."""
        if not torch.is_floating_point(x) or x.ndim < 2 or x.shape[0] == 0:
            raise ValueError(
                f"inputs must be a float tensor with a sample axis and at least one feature axis, got {x.dtype} {tuple(x.shape)}"
            )
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"inputs have samples of shape {tuple(x.shape[1:])}, the model takes {self.input_shape}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("inputs contain NaN or infinite values")
        if self.backbone_id is not None:
            return  # features: the raw inputs were checked against input_range before the backbone
        low, high = self.config.input_range
        lowest, highest = (float(v) for v in torch.aminmax(x))
        if lowest < low or highest > high:
            raise ValueError(
                f"inputs span [{lowest:.4g}, {highest:.4g}], outside the declared input_range [{low:g}, {high:g}]"
            )

    def _train_step(self, x: torch.Tensor, y: torch.Tensor) -> str | None:
        """One optimiser step; returns None, or why it was rolled back (model and optimiser as before).

        Finite inputs can still overflow inside the network; a step that produced a non-finite
        loss, gradient, weight, buffer (batch-norm statistics move in the forward pass) or
        optimiser moment would poison every later batch and checkpoint.
        """
        return _train_step(self.model, self.optimizer, x, y)

    def _window(self) -> int:
        """The error window W: the detector's when it has one, else the paper's default of 3."""
        return getattr(self.config.drift, "window", 3)

    def _target_rolling_error(self) -> float | None:
        window = self._window()
        if len(self._target_errors) < window:
            return None
        return float(np.mean(list(self._target_errors)[-window:]))

    def _pre_drift_error(self) -> float:
        """Mean target error over the batches before the drift window: the level a helper must restore."""
        window = self._window()
        errors = list(self._target_errors)
        before = errors[-(window + _BASELINE_BATCHES) : -window] or errors[:1]
        return float(np.mean(before))

    def _drift_report(self, index: int, longrun_before: np.ndarray) -> DriftReport:
        if self.detector.novel_classes:
            classes = tuple(sorted(self.detector.novel_classes))
            reason = "novelty"
        else:
            # Classes that are new or sharply risen in any recent batch say what changed (batch by
            # batch, so a window straddling the onset does not dilute them); a class that is merely
            # hard (high error all along) is asked for only when nothing new explains the drift.
            classes = tuple(sorted({c for h in self._recent_hist for c in classes_to_request(longrun_before, h)}))
            if not classes:
                counts = np.sum([c for c, _ in self._recent_class_err], axis=0)
                errs = np.sum([e for _, e in self._recent_class_err], axis=0)
                class_err = np.divide(errs, counts, out=np.full(self.num_classes, np.nan), where=counts > 0)
                classes = tuple(classes_to_request(longrun_before, counts, class_err))
            reason = self.detector.name
        return DriftReport(
            batch_index=index, classes=classes, reason=reason, baseline=self._pre_drift_error(), pool=self.pool_state()
        )

    # -- as helper -------------------------------------------------------------------------------

    def significant_for(self, classes: Sequence[int], z: float) -> SignificantParams:
        """The significant parameters of this node's model for ``classes`` (or the random control)."""
        def scores() -> dict[str, torch.Tensor]:
            return self.sensitivity_source.scores(
                self.model, self.reservoir, classes, samples=self.config.picker_samples or None, generator=self._rng
            )

        positions = self.position_choice.positions(self._shapes, z, scores, self._rng)
        return significant_params(
            self.model, positions, arch_id=self.arch_id, lineage=self.lineage, classes=classes, z=z
        )

    def kt_blob(self, classes: Sequence[int], z: float, value_codec: str | None = None) -> bytes:
        """Answer a KT request: the codec's blob of the significant parameters for ``classes``."""
        bad = [c for c in classes if not 0 <= int(c) < self.num_classes]
        if not classes or bad or len(set(classes)) != len(classes):
            raise KtRejected(f"requested classes {list(classes)} are not distinct classes in [0, {self.num_classes})")
        if not 0.0 < z <= 1.0:
            raise KtRejected(f"requested z={z} is outside (0, 1]")
        sig = self.significant_for(tuple(int(c) for c in classes), float(z))
        value_codec = value_codec or self.config.value_codec
        # Some codecs only exist as deltas from the shared base, whatever value_delta says.
        base = self._base_params if self.config.value_delta or value_codec in codec.DELTA_CODECS else None
        return codec.encode_blob(sig, value_codec=value_codec, base=base)

    # -- as target -------------------------------------------------------------------------------

    def decode_blob(self, blob: bytes) -> SignificantParams:
        """Validate a received blob against this node's model; raises KtRejected, changes nothing."""
        return codec.decode_blob(
            blob,
            arch_id=self.arch_id,
            lineage=self.lineage,
            shapes=self._shapes,
            num_classes=self.num_classes,
            base=self._base_params,
        )

    def accept_kt_blob(
        self, blob: bytes, *, classes: Sequence[int], z: float, source: str = "", baseline: float | None = None
    ) -> Installed:
        """Decode, vet and use a KT blob per ``kt_apply``; on any rejection nothing changes.

        ``classes`` and ``z`` are what this node asked for: a blob must answer that request, hold
        values a model of this lineage could have, and give a helper whose outputs on the last
        batch are finite and not worse than chance on the classes it brings — checked before it
        serves a single request.
        """
        t0 = time.perf_counter()
        sig = self.decode_blob(blob)
        vetting.vet_significant(sig, classes=classes, z=z, reference=dict(trainable_params(self.model)))
        if not self.knowledge_use.enabled:
            raise KtRejected("knowledge transfer is off on this node (kt_apply = 'off')")
        probe = booster.boosted_helper(self.model, sig)
        probe_p = None
        # A zero-filled helper is the paper's deliberately crippled baseline (Fig. 3): only the
        # boosted model, which every other mode writes or serves, is held to chance.
        if self._last_batch is not None:
            x, y = self._last_batch
            with torch.no_grad():
                logits = vetting.vet_helper_outputs(probe, x, y if self.config.helper_probe else None, sig.classes, self.num_classes)
                probe_p = torch.softmax(logits, dim=1)
        return self.install(sig, source=source, started=t0, boosted=probe, boosted_p=probe_p, baseline=baseline)

    def install(
        self,
        sig: SignificantParams,
        *,
        source: str = "",
        started: float | None = None,
        boosted: nn.Module | None = None,
        boosted_p: torch.Tensor | None = None,
        baseline: float | None = None,
    ) -> Installed:
        """Use already-validated significant parameters per ``kt_apply``: pool a helper, or change the target.

        ``boosted``: the boosted helper already built from ``sig`` (to vet it), reused as is;
        ``boosted_p``: its probabilities on the last batch (from vetting), reused likewise.
        ``baseline``: the error the helper must restore (its request's; None: the pre-drift error now).
        """
        t0 = started if started is not None else time.perf_counter()
        helper_id = None
        evicted: list[str] = []
        helper_model = self.knowledge_use.use(self.model, sig, boosted)
        if helper_model is not None:
            helper_id = f"h{next(self._helper_ids)}"
            branch = optimizer = None
            if self.knowledge_use.branches:
                # The branch learns as the target would have after the write: the same optimiser state.
                branch = booster.live_branch(helper_model, self._shapes.keys())
                optimizer = Adam([p for _, p in trainable_params(branch)], lr=self.config.lr)
                optimizer.load_state_dict(_cloned_state(self.optimizer))
            evicted = self.pool.add(
                PooledHelper(
                    helper_id=helper_id,
                    model=helper_model,
                    classes=sig.classes,
                    installed_at=self.batch_index,
                    baseline_error=baseline if baseline is not None else self._pre_drift_error(),
                    source=source,
                    branch=branch,
                    optimizer=optimizer,
                )
            )
            # The pooled helper and its live copy (the same weights, so far) output what vetting computed.
            known = {helper_id: boosted_p, f"{helper_id}+": boosted_p} if helper_model is boosted and boosted_p is not None else {}
            self._learn_trust_on_last_batch(known)
        return Installed(
            helper_id=helper_id,
            classes=sig.classes,
            count=sig.count,
            evicted=tuple(evicted),
            seconds=time.perf_counter() - t0,
        )

    @torch.no_grad()
    def _learn_trust_on_last_batch(self, known: Mapping[str, torch.Tensor]) -> None:
        """Give a learning operator the last labelled batch's evidence before a new helper serves
        (``known``: members' probabilities on that batch already computed, by member id)."""
        if not self.operator.learns or self._last_batch is None or self._last_batch[1] is None:
            return
        x, y = self._last_batch
        target_p, helper_ps = self._probabilities(x, {**self._last_frozen_ps, **known})
        members = self.members()
        self.operator.learn(target_p, helper_ps, [m.classes for m in members], [m.member_id for m in members], y)

    # -- metadata --------------------------------------------------------------------------------

    def histogram(self) -> np.ndarray:
        """Long-run class counts of the labels this node has learnt from."""
        return self.longrun_hist.copy()

    def rolling_error(self) -> float | None:
        return self._target_rolling_error()


def _train_step(model: nn.Module, optimizer: Adam, x: torch.Tensor, y: torch.Tensor) -> str | None:
    """One optimiser step of ``model``; None, or why it was rolled back (see ``Learner._train_step``)."""
    # Only what a step can change: the trainable parameters and the buffers outside frozen modules.
    live = learnt_state(model, keep_vars=True)
    before = _snapshot(live, optimizer)
    train_mode(model)
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    if not bool(torch.isfinite(loss)):
        reason = f"the loss is {float(loss.detach())}"
    else:
        loss.backward()
        if not _all_finite([p.grad for p in model.parameters() if p.grad is not None]):
            reason = "a gradient is not finite"
        else:
            optimizer.step()
            if _all_finite([*live.values(), *_optimizer_tensors(optimizer)]):
                return None
            reason = "the step made a weight, a buffer or an optimiser moment non-finite"
    _restore(live, optimizer, before)
    optimizer.zero_grad(set_to_none=True)
    return reason


def _check_frozen(model: nn.Module, base: Mapping[str, torch.Tensor]) -> None:
    """ValueError unless something trains and every frozen parameter holds the base's values.

    Frozen parameters never travel: they must be the same on every node, and the base weights
    are what every node of one lineage shares.
    """
    if not trainable_params(model):
        raise ValueError("the model has no trainable parameter")
    for name, p in model.named_parameters():
        if not p.requires_grad and (name not in base or not torch.equal(p.detach().cpu(), base[name])):
            raise ValueError(f"frozen parameter {name} is not the base weights': a frozen parameter must be the same on every node")


def _cloned_state(optimizer: Adam) -> dict[str, Any]:
    """The optimiser's state dict with every tensor copied (``state_dict`` holds the live ones)."""
    state = optimizer.state_dict()
    return {
        "state": {i: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()} for i, st in state["state"].items()},
        "param_groups": state["param_groups"],
    }


def _all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    if not tensors:
        return True
    # One reduction per tensor, then one sync: cheap next to the step itself.
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def _optimizer_tensors(optimizer: Adam) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def _snapshot(live: Mapping[str, torch.Tensor], optimizer: Adam) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {name: t.detach().clone() for name, t in live.items()}
    state = {
        id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
        for p, st in optimizer.state.items()
    }
    return tensors, state


def _restore(live: Mapping[str, torch.Tensor], optimizer: Adam, snapshot: tuple[dict[str, torch.Tensor], dict]) -> None:
    tensors, state = snapshot
    with torch.no_grad():
        for name, saved in tensors.items():
            live[name].copy_(saved)
    for p in list(optimizer.state):
        saved = state.get(id(p))
        if saved is None:
            del optimizer.state[p]  # the rolled-back step was this parameter's first
        else:
            optimizer.state[p] = saved
