"""The FedAvg aggregator of the fleet simulator's baseline (ARCHITECTURE.md §7).

Every `every` batches, the round's participants (`agent.fl.participants`) publish a `ModelUpdate`
on `fl/{job}/update/{id}`; this service collects them and, once all `per_round` have come, or
`round_timeout` s after the first one came, publishes the sample-weighted average as a
`GlobalModel` on `fl/{job}/global`. Models of ~2 MB travel chunked; the client reassembles them.

Rounds:

- An update counts only if its topic, `node_id` and `job` agree and its sender is a participant
  of its round; anything else is ignored and counted (`stats()`): `non_participant`, `duplicate`
  (the sender already counted in that round: a QoS 1 redelivery), `stale` (a round at or below the
  last one published), `mismatch` (names, shapes or dtypes other than the first update accepted),
  `invalid` (not a `ModelUpdate`, or undecodable).
- Published rounds only go up: publishing round `r` drops any open round below `r` (its
  updates are superseded), so a node may simply adopt every global model it receives.
- At most `max_open_rounds` rounds collect at once; a new round beyond that drops the oldest.

The global model goes out at QoS 1, **not retained**: a retained message must fit in one MQTT
message and a model does not (the client refuses to chunk a retained payload). Nodes keep a
persistent session, so the broker queues a global model published while a node is briefly
disconnected; a node that joins later adopts the next round's model.

    python -m edge_sim.aggregator --broker mqtt://127.0.0.1:1883 --job demo --every 10 \\
        --members edge-0,edge-1,edge-2,edge-3 --per-round 3

Exit codes (`service.exit_codes`, as every daemon): 0 after SIGTERM/SIGINT, 78 for a bad flag or
configuration, 1 for a crash. Logs go to stderr, or to the journal under systemd (`service.logs`).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from agent.fl import FlConfig, FlRejected, fedavg, global_from_tensors, layout, participants
from broker import topics
from broker.client import ErrorEvent, InboxItem, MqttClient
from broker.errors import BusError
from broker.wire import ModelUpdate
from service.cli import ServiceArgumentParser
from service.exit_codes import EXIT_CONFIG, EXIT_CRASH, EXIT_OK
from service.logs import configure_logging

log = logging.getLogger("clue.aggregator")

_IGNORED = ("non_participant", "duplicate", "stale", "mismatch", "invalid")


@dataclass
class _Round:
    number: int
    expected: frozenset[str]
    opened_at: float
    updates: dict[str, ModelUpdate] = field(default_factory=dict)


class FedAvgAggregator:
    """Averages each round's updates of one job and publishes the global model (module docstring).

    `start()` subscribes and starts a worker thread that owns the client's inbox; the caller
    starts and stops the client.
    """

    def __init__(
        self,
        client: MqttClient,
        cfg: FlConfig,
        *,
        round_timeout: float = 30.0,
        max_open_rounds: int = 4,
    ) -> None:
        if not round_timeout > 0:
            raise ValueError("round_timeout must be > 0 s")
        if max_open_rounds < 1:
            raise ValueError("max_open_rounds must be >= 1")
        self.client = client
        self.cfg = cfg
        self.round_timeout = round_timeout
        self.max_open_rounds = max_open_rounds
        self._topic = topics.fl_global(cfg.job)
        self._open: dict[int, _Round] = {}
        self._last_round = -1
        self._layout: dict[str, tuple[str, tuple[int, ...]]] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stats = dict.fromkeys(
            (
                "rounds_published",
                "rounds_partial",
                "rounds_dropped",
                "updates_received",
                "updates_accepted",
                "updates_used",
                "publish_failed",
                "errors",
                *(f"ignored_{k}" for k in _IGNORED),
            ),
            0,
        )

    def start(self) -> "FedAvgAggregator":
        """Subscribe to `fl/{job}/update/+` and start the worker thread."""
        self.client.subscribe(topics.fl_updates(self.cfg.job), 1)
        self._thread = threading.Thread(target=self._run, name=f"fedavg-{self.cfg.job}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the worker; open rounds are abandoned."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def stats(self) -> dict[str, int]:
        """Counters, plus `updates_ignored` (their sum), `open_rounds` and `last_round` (-1: none)."""
        with self._lock:
            out = dict(self._stats, open_rounds=len(self._open), last_round=self._last_round)
        out["updates_ignored"] = sum(out[f"ignored_{k}"] for k in _IGNORED)
        return out

    # --- the worker ----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            item = self.client.get(timeout=0.1)
            try:
                if item is not None:
                    self._handle(item)
                self._expire(time.monotonic())
            except Exception:  # noqa: BLE001 - keep aggregating
                self._count("errors")
                log.exception("aggregator %s: error handling an item", self.cfg.job)

    def _handle(self, item: InboxItem) -> None:
        if isinstance(item, ErrorEvent):
            if item.context in ("decode", "chunk", "size"):
                self._count("updates_received")
                self._ignore("invalid", f"{item.context} error on {item.topic}: {item.error}")
            else:
                log.warning("aggregator %s: %s error: %s", self.cfg.job, item.context, item.error)
            return
        self._count("updates_received")
        msg = item.message
        if not isinstance(msg, ModelUpdate) or msg.job != self.cfg.job or item.topic != _update_topic(msg):
            self._ignore("invalid", f"not a model update of job {self.cfg.job} on its own topic: {item.topic}")
            return
        if msg.round <= self._last_round:
            self._ignore("stale", f"{msg.node_id}: round {msg.round}, last published {self._last_round}")
            return
        if msg.node_id not in self.cfg.members or msg.node_id not in participants(self.cfg, msg.round):
            self._ignore("non_participant", f"{msg.node_id} is no participant of round {msg.round}")
            return
        rnd = self._open.get(msg.round)
        if rnd is not None and msg.node_id in rnd.updates:
            self._ignore("duplicate", f"{msg.node_id} already sent round {msg.round}")
            return
        shape = layout(msg)
        if self._layout is None:
            self._layout = shape
        elif shape != self._layout:
            self._ignore("mismatch", f"{msg.node_id}: tensors differ from the first update accepted")
            return
        if rnd is None:
            rnd = self._open_round(msg.round)
        rnd.updates[msg.node_id] = msg
        self._count("updates_accepted")
        if len(rnd.updates) == len(rnd.expected):
            self._close(rnd, partial=False)

    def _open_round(self, number: int) -> _Round:
        while len(self._open) >= self.max_open_rounds:
            oldest = self._open[min(self._open)]
            self._drop(oldest, f"more than {self.max_open_rounds} rounds open")
        rnd = _Round(number, frozenset(participants(self.cfg, number)), time.monotonic())
        with self._lock:
            self._open[number] = rnd
        return rnd

    def _expire(self, now: float) -> None:
        for number in sorted(self._open):
            rnd = self._open.get(number)
            if rnd is not None and now - rnd.opened_at >= self.round_timeout:
                missing = sorted(rnd.expected - rnd.updates.keys())
                log.warning(
                    "round %d of %s: %.1f s passed, averaging %d of %d updates (missing %s)",
                    number, self.cfg.job, self.round_timeout, len(rnd.updates), len(rnd.expected), missing,
                )
                self._close(rnd, partial=True)

    def _close(self, rnd: _Round, *, partial: bool) -> None:
        for number in [n for n in self._open if n < rnd.number]:
            self._drop(self._open[number], f"round {rnd.number} closed first")
        updates = [rnd.updates[m] for m in sorted(rnd.updates)]
        with self._lock:
            del self._open[rnd.number]
            self._last_round = rnd.number
        try:
            tensors = fedavg(updates)
        except FlRejected as exc:  # the layout check makes this a bug, not a node's fault
            self._count("errors")
            log.error("round %d of %s not averaged: %s", rnd.number, self.cfg.job, exc)
            return
        samples = sum(u.samples for u in updates)
        message = global_from_tensors(tensors, job=self.cfg.job, round=rnd.number, samples=samples)
        try:
            self.client.publish_message(self._topic, message, 1)
        except BusError as exc:
            self._count("publish_failed")
            log.error("round %d of %s: global model not published: %s", rnd.number, self.cfg.job, exc)
            return
        with self._lock:
            self._stats["rounds_published"] += 1
            self._stats["rounds_partial"] += partial
            self._stats["updates_used"] += len(updates)
        log.info(
            "round %d of %s: published the average of %d updates (%d samples)",
            rnd.number, self.cfg.job, len(updates), samples,
        )

    def _drop(self, rnd: _Round, why: str) -> None:
        with self._lock:
            del self._open[rnd.number]
            self._stats["rounds_dropped"] += 1
        log.warning("round %d of %s dropped with %d updates: %s", rnd.number, self.cfg.job, len(rnd.updates), why)

    def _ignore(self, reason: str, detail: str) -> None:
        self._count(f"ignored_{reason}")
        log.debug("aggregator %s: ignored (%s): %s", self.cfg.job, reason, detail)

    def _count(self, key: str) -> None:
        with self._lock:
            self._stats[key] += 1


def _update_topic(msg: ModelUpdate) -> str:
    return topics.fl_update(msg.job, msg.node_id)


# --- command line ----------------------------------------------------------------------------


def build_parser() -> ServiceArgumentParser:
    """The argument parser of `python -m edge_sim.aggregator`."""
    p = ServiceArgumentParser(prog="clue-aggregator", description="FedAvg aggregator of the CLUE Edge baseline.")
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883", help="mqtt://host:port, mqtts://host:port, unix:///path or a socket path")
    p.add_argument("--job", required=True, help="job id (the fl/{job}/… topics)")
    p.add_argument("--every", type=int, required=True, help="f: a round every f batches")
    p.add_argument("--members", required=True, help="comma-separated node ids of the job (n)")
    p.add_argument("--per-round", type=int, required=True, help="n′: participants per round")
    p.add_argument("--seed", type=int, default=0, help="seed of the participant draw (same on every node)")
    p.add_argument("--round-timeout", type=float, default=30.0, help="s after a round's first update to average what came")
    p.add_argument("--max-open-rounds", type=int, default=4, help="rounds collected at once")
    p.add_argument("--client-id", default=None, help="MQTT client id (default: aggregator-{job})")
    p.add_argument("--username", default=None)
    p.add_argument("--password-file", default=None, help="file holding the broker password")
    p.add_argument("--tls-ca", default=None, help="CA certificate file")
    p.add_argument("--tls-cert", default=None, help="client certificate file (CN aggregator)")
    p.add_argument("--tls-key", default=None, help="client key file")
    p.add_argument("--stats-interval", type=float, default=60.0, help="s between stats lines in the log (0: only at exit)")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the aggregator until SIGTERM or SIGINT; return the exit code."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, identifier="clue-aggregator")
    try:
        cfg = FlConfig(
            job=args.job,
            every=args.every,
            members=[m.strip() for m in args.members.split(",") if m.strip()],
            per_round=args.per_round,
            seed=args.seed,
        )
        for path in (args.password_file, args.tls_ca, args.tls_cert, args.tls_key):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"no such file: {path}")
        if args.stats_interval < 0:
            raise ValueError("--stats-interval must be >= 0")
        # All members may send at once (non-participants too): room to reassemble every transfer.
        client = MqttClient.from_url(
            f"unix://{args.broker}" if args.broker.startswith("/") else args.broker,
            client_id=args.client_id or f"aggregator-{cfg.job}",
            username=args.username,
            password_file=args.password_file,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            max_transfers=max(16, 2 * len(cfg.members)),
            name=f"aggregator-{cfg.job}",
        )
        aggregator = FedAvgAggregator(
            client, cfg, round_timeout=args.round_timeout, max_open_rounds=args.max_open_rounds
        )
    except (ValidationError, ValueError) as exc:
        print(f"clue-aggregator: bad configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        aggregator.start()
        client.start()
        log.info(
            "aggregating job %s: %d of %d members per round, every %d batches, on %s",
            cfg.job, cfg.per_round, len(cfg.members), cfg.every, args.broker,
        )
        next_stats = time.monotonic() + args.stats_interval
        while not stop.wait(1.0):
            if args.stats_interval and time.monotonic() >= next_stats:
                log.info("stats %s", json.dumps(aggregator.stats()))
                next_stats = time.monotonic() + args.stats_interval
    except Exception:  # noqa: BLE001 - a crash is exit 1, told apart from a bad config
        log.exception("aggregator crashed")
        return EXIT_CRASH
    finally:
        aggregator.stop()
        client.stop()
        log.info("final stats %s", json.dumps(aggregator.stats()))
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["FedAvgAggregator", "build_parser", "main"]
