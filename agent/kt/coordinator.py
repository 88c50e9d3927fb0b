"""The help coordinator: the whole life of a knowledge transfer as a target, with no I/O.

Events go in, commands come out. The learner reports what one labelled batch showed (a drift and
the classes behind it, helpers it dropped as unhelpful, what its pool holds); the transport
reports the MdS's candidates, a helper's answer and whether the received blob was installed. The
coordinator answers with commands: query the MdS (`QueryHelpers`), ask a helper (`AskHelper`),
install a blob (`Install`), publish an event (`Report`), show a status line (`Status`). The daemon
carries them to the bus and routes each reply back by the request's correlation id; the
in-process simulator carries them with function calls. Both get the same policy:

- **cooldown**: the same classes are asked for at most once per `cooldown` batches;
- **delay**: a request goes out `delay` batches after the drift that caused it (the paper's
  "delayed by X");
- **retry**: the classes of a helper dropped as no better than the target are asked for again
  once the cooldown of its request is over, avoiding the nodes that sent a useless helper;
- **baseline**: every request carries the error before its drift, which its helper must restore;
- **one transfer at a time**: a request made while another transfer is under way waits in a queue
  and starts when it ends, for the classes still missing, never dropped;
- **splitting**: when no candidate holds every missing class, up to `split_helpers` candidates are
  asked in turn for what is still missing (`HelperSelection` says whom and for what).

Every transfer ends with exactly one `help_done` (some helper installed) or `help_failed` event.
A reply for a flow that is not the one waiting for it (a late or a repeated one) changes nothing.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from agent.kt.helper_selection import CandidateInfo, Cover, HelperSelection, HelperSelectionConfig, Rank


@dataclass(frozen=True)
class HelpPolicy:
    """The knobs of the coordinator (from the learner's config and, for `relay`, the daemon's)."""

    enabled: bool = True
    cooldown: int = 10
    delay: int = 0
    split_helpers: int = 4
    selection: HelperSelectionConfig = field(default_factory=HelperSelectionConfig)
    k: int = 3
    z: float = 0.5
    value_codec: str = "float16"
    #: Ask this one candidate for every class instead of querying the MdS (the trusted relay,
    #: which queries the MdS itself and hides the helper's identity); None: query the MdS.
    relay: str | None = None


@dataclass(frozen=True)
class PoolState:
    """What the target's helper pool holds at one moment."""

    classes: frozenset[int]
    size: int
    max_size: int

    @property
    def has_room(self) -> bool:
        # A full pool takes a new helper only by evicting one still serving: ask nobody instead.
        return self.size < self.max_size


@dataclass(frozen=True)
class DriftReport:
    """A drift the learner detected: the classes that explain it and the error before it."""

    batch_index: int
    classes: tuple[int, ...]
    reason: str
    #: The target's error before the drift: what a helper installed for it must restore.
    baseline: float
    #: The pool when the drift was detected.
    pool: PoolState


@dataclass(frozen=True)
class DroppedHelper:
    """A helper the learner dropped as no better than the target on its own classes."""

    helper_id: str
    classes: tuple[int, ...]
    source: str
    installed_at: int
    baseline: float


@dataclass(frozen=True)
class HelpRequest:
    """Knowledge wanted for `classes`; `avoid`: nodes whose helpers for them proved useless."""

    classes: tuple[int, ...]
    z: float
    value_codec: str
    batch_index: int
    reason: str
    baseline: float
    avoid: tuple[str, ...] = ()


@dataclass(frozen=True)
class QueryHelpers:
    """Ask the MdS for up to `k` candidates holding `classes` (`cover`), ranked by `rank`."""

    flow: int
    classes: tuple[int, ...]
    cover: Cover
    rank: Rank
    k: int


@dataclass(frozen=True)
class AskHelper:
    """Ask `helper` for its significant parameters for `classes`."""

    flow: int
    helper: str
    classes: tuple[int, ...]
    z: float
    value_codec: str


@dataclass(frozen=True)
class Install:
    """Install `blob` from `source`; report the outcome with `installed` or `install_refused`."""

    flow: int
    blob: bytes
    classes: tuple[int, ...]
    z: float
    source: str
    baseline: float
    #: When and at which batch the flow's drift was seen (`clock()`), for the time to a helper.
    detected_at: float
    detected_batch: int


@dataclass(frozen=True)
class Report:
    """An event for the node's event topic."""

    kind: str
    detail: dict[str, Any]


@dataclass(frozen=True)
class Status:
    """A one-line status for the service manager."""

    text: str


Command = QueryHelpers | AskHelper | Install | Report | Status


@dataclass
class _Flow:
    """The one transfer in progress; `waiting` says which reply it waits for."""

    id: int
    request: HelpRequest
    number: int
    #: Fixed for the flow's life: a config change mid-transfer does not switch strategy half-way.
    selection: HelperSelection
    detected_at: float
    missing: set[int]
    waiting: Literal["candidates", "answer", "install"] = "candidates"
    candidates: list[CandidateInfo] = field(default_factory=list)
    tried: list[str] = field(default_factory=list)
    helper: str = ""
    #: The classes the current helper was asked for: its blob must bring exactly these.
    asked: tuple[int, ...] = ()
    installed: int = 0


class HelpCoordinator:
    """One node's knowledge transfers as a target (module docstring); `clock` times them."""

    def __init__(self, policy: HelpPolicy | None = None, *, clock: Callable[[], float] = time.perf_counter) -> None:
        self.policy = policy or HelpPolicy()
        self._clock = clock
        #: Batch at which each class set was last asked for (the cooldown).
        self._asked: dict[tuple[int, ...], int] = {}
        self._delayed: HelpRequest | None = None
        self._retry: HelpRequest | None = None
        self._unhelpful: dict[int, set[str]] = {}
        self._flow: _Flow | None = None
        self._queue: deque[HelpRequest] = deque()
        self._flows = 0

    @property
    def active(self) -> HelpRequest | None:
        """The request of the transfer in progress, if any."""
        return self._flow.request if self._flow is not None else None

    @property
    def queued(self) -> tuple[HelpRequest, ...]:
        return tuple(self._queue)

    def configure(self, policy: HelpPolicy) -> None:
        """New knobs from the next event on; a transfer in progress keeps its selection."""
        self.policy = policy

    # -- events from the learner ---------------------------------------------------------------

    def on_batch(
        self,
        batch_index: int,
        *,
        drift: DriftReport | None,
        dropped: Sequence[DroppedHelper] = (),
        pool: PoolState,
    ) -> list[Command]:
        """One labelled batch was learnt from: `drift` if it showed one, `dropped` helpers, `pool` now."""
        policy = self.policy
        request = None
        if drift is not None and policy.enabled:
            request = self._request_for(drift)
            if request is not None and policy.delay > 0:
                self._delayed, request = request, None
        if self._delayed is not None and batch_index - self._delayed.batch_index >= policy.delay:
            request = replace(self._delayed, batch_index=batch_index)
            self._delayed = None
        for helper in dropped:
            self._schedule_retry(batch_index, helper)
        if request is None and self._retry is not None and batch_index >= self._retry.batch_index:
            retry, self._retry = self._retry, None
            classes = tuple(c for c in retry.classes if c not in pool.classes)
            if classes and pool.has_room:
                self._asked[classes] = batch_index
                request = replace(retry, classes=classes, batch_index=batch_index, avoid=self._avoid_for(classes))
        if request is None:
            return []
        if self._flow is not None:
            self._queue.append(request)
            return [Report("help_queued", {"classes": list(request.classes), "reason": request.reason,
                                           "behind": list(self._flow.request.classes)})]
        return self._start(request, pool)

    def _request_for(self, drift: DriftReport) -> HelpRequest | None:
        classes = tuple(c for c in drift.classes if c not in drift.pool.classes)
        if not classes or not drift.pool.has_room:
            return None
        last = self._asked.get(classes)
        if last is not None and drift.batch_index - last < self.policy.cooldown:
            return None
        self._asked[classes] = drift.batch_index
        return HelpRequest(
            classes=classes, z=self.policy.z, value_codec=self.policy.value_codec, batch_index=drift.batch_index,
            reason=drift.reason, baseline=drift.baseline, avoid=self._avoid_for(classes),
        )

    def _schedule_retry(self, batch_index: int, helper: DroppedHelper) -> None:
        """Ask again for an unhelpful helper's classes, once the request's cooldown is over."""
        for c in helper.classes:
            self._unhelpful.setdefault(c, set()).add(helper.source)
        due = max(batch_index + 1, helper.installed_at + self.policy.cooldown)
        self._retry = HelpRequest(
            classes=helper.classes, z=self.policy.z, value_codec=self.policy.value_codec, batch_index=due,
            reason="unhelpful_helper", baseline=helper.baseline,
        )

    def _avoid_for(self, classes: Collection[int]) -> tuple[str, ...]:
        return tuple(sorted({s for c in classes for s in self._unhelpful.get(c, ()) if s}))

    # -- events from the transport -------------------------------------------------------------

    def on_candidates(
        self, flow: int, candidates: Sequence[CandidateInfo] | None, *, error: str | None = None, pool: PoolState
    ) -> list[Command]:
        """The MdS answered flow `flow`'s query (`candidates`), or it failed (`error`)."""
        current = self._waiting(flow, "candidates")
        if current is None:
            return []
        avoid = set(current.request.avoid)
        current.candidates = [c for c in candidates or () if c.node_id not in avoid]
        if not current.candidates:
            self._flow = None
            return [
                Report("help_failed", {"stage": "query", "error": error or "no candidates"}),
                Status("serving (no helper found)"),
                *self._next_queued(pool),
            ]
        return self._ask_next(current, pool)

    def on_answer(self, flow: int, blob: bytes | None, *, error: str | None = None, pool: PoolState) -> list[Command]:
        """The helper asked in flow `flow` sent `blob`, or the request failed (`error`)."""
        current = self._waiting(flow, "answer")
        if current is None:
            return []
        if blob is None:
            return [Report("kt_failed", {"helper": current.helper, "error": error or "no answer"}), *self._ask_next(current, pool)]
        current.waiting = "install"
        return [
            Install(
                flow=current.id, blob=blob, classes=current.asked, z=current.request.z, source=current.helper,
                baseline=current.request.baseline, detected_at=current.detected_at,
                detected_batch=current.request.batch_index,
            )
        ]

    def installed(self, flow: int, classes: Collection[int], *, pool: PoolState) -> list[Command]:
        """Flow `flow`'s blob now serves for `classes`: ask for what is missing, or end."""
        current = self._waiting(flow, "install")
        if current is None:
            return []
        current.installed += 1
        current.missing.difference_update(classes)
        # Knowledge spread over several nodes: the next candidate is asked for what is still missing.
        if current.missing and pool.has_room and current.installed < self.policy.split_helpers:
            return self._ask_next(current, pool)
        return self._end(current, pool)

    def install_refused(self, flow: int, reason: str, *, pool: PoolState) -> list[Command]:
        """Flow `flow`'s blob was refused (it did not answer the request, or its helper failed)."""
        current = self._waiting(flow, "install")
        if current is None:
            return []
        return [Report("rejected", {"reason": f"KT blob from {current.helper}: {reason}"}), *self._ask_next(current, pool)]

    # -- the flow ------------------------------------------------------------------------------

    def _waiting(self, flow: int, what: str) -> _Flow | None:
        current = self._flow
        return current if current is not None and current.id == flow and current.waiting == what else None

    def _start(self, request: HelpRequest, pool: PoolState) -> list[Command]:
        self._flows += 1
        selection = self.policy.selection.build()
        flow = _Flow(
            id=self._flows, request=request, number=self._flows - 1, selection=selection,
            detected_at=self._clock(), missing=set(request.classes),
        )
        self._flow = flow
        drift = Report("drift", {"batch": request.batch_index, "classes": list(request.classes),
                                 "reason": request.reason, "avoid": list(request.avoid)})
        if self.policy.relay is not None:
            # A candidate that names no classes vouches for all of them: the relay is asked for every one.
            flow.candidates = [CandidateInfo(self.policy.relay)]
            return [drift, *self._ask_next(flow, pool)]
        cover, rank = selection.query(flow.number)
        return [
            drift,
            QueryHelpers(flow.id, request.classes, cover, rank, self.policy.k),
            Status(f"asking the MdS for classes {list(request.classes)}"),
        ]

    def _ask_next(self, flow: _Flow, pool: PoolState) -> list[Command]:
        ask = flow.selection.next_ask(flow.candidates, flow.missing, flow.tried, flow.number)
        if ask is None:
            return self._end(flow, pool)
        flow.helper = ask.helper
        flow.asked = tuple(ask.classes)
        flow.tried.append(ask.helper)
        flow.waiting = "answer"
        return [
            AskHelper(flow.id, ask.helper, flow.asked, flow.request.z, flow.request.value_codec),
            Report("help_requested", {"helper": ask.helper, "classes": list(ask.classes)}),
            Status(f"asking {ask.helper} for classes {list(ask.classes)}"),
        ]

    def _end(self, flow: _Flow, pool: PoolState) -> list[Command]:
        if flow.installed == 0:
            done: list[Command] = [Report("help_failed", {"stage": "kt", "tried": list(flow.tried)}), Status("serving (no helper answered)")]
        else:
            done = [
                Report("help_done", {"helpers": flow.installed, "missing": sorted(flow.missing), "tried": list(flow.tried)}),
                Status(f"serving with {pool.size} helper(s)"),
            ]
        self._flow = None
        return [*done, *self._next_queued(pool)]

    def _next_queued(self, pool: PoolState) -> list[Command]:
        """The transfer in progress is over: start the next queued request still worth asking."""
        while self._queue:
            request = self._queue.popleft()
            classes = tuple(c for c in request.classes if c not in pool.classes)
            if classes and pool.has_room:
                return self._start(replace(request, classes=classes), pool)
        return []
