"""``clue-agent``: the edge daemon. It wires one Learner to the bus (ARCHITECTURE §3).

The paho thread only decodes, validates and enqueues (``MqttClient``). One worker thread owns the
model and handles, in arrival order: request batches, KT requests (as a helper), MdS and KT
replies (as a target), config patches. No lock around the model is needed and the order of work
is reproducible. Knowledge transfer as a target is `agent.kt.coordinator.HelpCoordinator`'s: the
worker gives it what each labelled batch showed, carries its commands to the bus (an MdS query, a
KT request, installing a received blob) and routes each reply or timeout back to it by the
request's correlation id, so the agent keeps serving batches while it waits.
"""

from __future__ import annotations

import collections
import copy
import logging
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.backbone import BackboneEngine, Split, build_engine, check_batch, split_model
from agent.checkpoint import load_newest_good, save_checkpoint
from agent.config import help_policy
from agent.errors import CheckpointError, ConfigError, KtRejected
from agent.fl import FlRejected, apply_global, is_round_batch, model_to_update, participants
from agent.kt.codec import VALUE_CODECS
from agent.kt.coordinator import AskHelper, Command, HelpCoordinator, HelpPolicy, Install, QueryHelpers, Status
from agent.kt.helper_selection import CandidateInfo
from agent.learner import BatchResult, Learner, Served
from agent.malloc import retain_freed_memory
from agent.metrics import AgentMetrics
from agent.runtime import EnsembleRuntime, resolve_device
from agent.served import LabelsRefused, ServedStore
from agent.settings import (
    AgentSettings,
    DaemonKnobs,
    load_settings,
    merge_patch,
    node_model,
    read_patches,
    reported_settings,
    split_patch,
    write_patches,
)
from broker import topics
from broker.client import ErrorEvent, Inbound, InboxItem, MqttClient, Responder
from broker.errors import BusError, RemoteError, RequestRejected
from broker.topology import kt_channel
from broker.wire import (
    ArrayPayload,
    ConfigAck,
    ConfigPatch,
    ConfigRequest,
    ConfigState,
    Envelope,
    ErrorReply,
    Event,
    GlobalModel,
    HelperList,
    HelpQuery,
    KtBlob,
    KtRequest,
    Labels,
    LabelsAck,
    NodeMeta,
    Prediction,
    RequestBatch,
    encode_app_json,
    is_json,
)
from service.cli import ServiceArgumentParser
from service.exit_codes import EXIT_CONFIG
from service.logs import configure_logging
from service.metrics import metrics_server
from service.notify import Notifier
from service.runner import Daemon, run
from service.worker import InboxWorker

log = logging.getLogger("clue.agent")

#: The candidate name of the trusted relay: in relay mode the target never learns the helper's id.
RELAY = "relay"


@dataclass
class RunningMean:
    """Count and sum of a stream of seconds: constant memory however long the daemon runs."""

    count: int = 0
    total: float = 0.0

    def add(self, value: float) -> None:
        self.count += 1
        self.total += value

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0


class _AgentWorker(InboxWorker[InboxItem]):
    """The one thread that owns the learner: messages in arrival order, then the KT flow and metadata."""

    def __init__(self, daemon: "AgentDaemon") -> None:
        super().__init__(daemon.client, name=f"clue-agent-{daemon.node_id}", poll=0.05)
        self.daemon = daemon

    def handle(self, item: InboxItem) -> None:
        self.daemon._handle(item)

    def tick(self) -> None:
        self.daemon._tick()

    def on_error(self, item: InboxItem | None, exc: Exception) -> None:
        # The handlers change the learner only once a message has passed its checks, so a message
        # that fails part-way leaves the model as it was (a training step is rolled back by itself).
        topic = getattr(item, "topic", None) or ("a tick" if item is None else "the connection")
        log.error("message on %s refused: it raised %s", topic, type(exc).__name__, exc_info=exc)
        self.daemon._reject(f"message on {topic} raised {type(exc).__name__}: {exc}", context="handler")


class AgentDaemon(Daemon):
    """One edge node: a Learner, its MQTT client, its checkpoints and its systemd integration.

    ``service.runner.run`` drives it (signals, readiness, the watchdog, exit codes); the worker is
    a ``service.worker.InboxWorker``.
    """

    def __init__(self, settings: AgentSettings, *, config_file: Path | None = None, notifier: Notifier | None = None) -> None:
        self.settings = settings
        self.config_file = config_file
        self.node_id = settings.node_id
        self.knobs: DaemonKnobs = settings.daemon
        self.notifier = notifier or Notifier()
        torch.set_num_threads(settings.torch_threads)
        self.device = resolve_device(settings.device)
        spec = settings.model_spec()
        model = node_model(settings)
        # Split serving (agent.backbone): the learner gets the head; the backbone runs on its own engine.
        self.split, self.backbone = self._split_serving(settings, model, spec.sample_shape())
        learner_model = model if self.split is None else self.split.head
        base = copy.deepcopy(learner_model.state_dict())
        self.learner = Learner(
            learner_model, num_classes=settings.num_classes, config=settings.learner, base_state=base,
            device=self.device, seed=settings.model_seed,
            input_shape=spec.input_shape if self.split is None else self.split.feature_shape,
            backbone_id=None if self.split is None else self.split.backbone_id,
        )
        # Run-time patches live in their own file, laid over the settings file at every start and
        # reload; the checkpoint's copy of the config is not what decides.
        info, self.checkpoint_refusals = load_newest_good(settings.checkpoint_path(), self.learner, restore_config=False)
        self.resumed = info is not None
        if info is not None:
            log.info("resumed from %s at batch %d", info.path, info.batch_index)
        for refusal in self.checkpoint_refusals:
            log.error("checkpoint refused, fell back to the previous one: %s", refusal)
        self.help = HelpCoordinator(self._help_policy())
        #: Unlabelled served batches, waiting for labels that come later.
        self.served = ServedStore(self.knobs.served_max_batches, int(self.knobs.served_max_mb * (1 << 20)))
        self.patches: dict[str, Any] = {}
        self.patch_drops: list[str] = []
        self._apply_stored_patches(settings.learner, settings.daemon)
        if retain_freed_memory(settings.malloc_retain_mb << 20):
            log.info("malloc keeps up to %d MiB of freed memory for reuse", settings.malloc_retain_mb)
        if settings.runtime == "onnx":
            self.learner.inference = EnsembleRuntime(providers=settings.onnx_providers, intra_op_num_threads=settings.torch_threads)
        self.client = self._make_client(settings)
        self.responder = Responder(self.client, self._serve_kt, cache_bytes=settings.reply_cache_mb << 20)
        self._reload = threading.Event()
        self._reloaded = threading.Event()
        #: Correlation id of each request of the coordinator in flight → (its flow, "query" or "kt").
        self._pending: dict[str, tuple[int, str]] = {}
        self._last_meta = -1e9
        self._meta_dirty = True
        #: Class shares and pool size of the last metadata published (None: nothing yet).
        self._published_meta: tuple[np.ndarray, int] | None = None
        self._batches_since_ckpt = 0
        self._status = ""
        # Running sums, not lists: a daemon serving 100 batches/s for months must not grow.
        self._timings: dict[str, RunningMean] = {name: RunningMean() for name in ("batch", "predict", "train", "pick", "install")}
        self._fl_samples = 0
        #: Labels were learnt since the last batch was served (a FedAvg participant then sends its model).
        self._learnt_since_serve = False
        self._expired_reported = 0
        self.metrics = AgentMetrics(
            client=self.client, timings=self._timings, checkpoint_path=settings.checkpoint_path(), pool_size=lambda: len(self.learner.pool),
            info={"arch_id": self.learner.arch_id, "lineage": self.learner.lineage},
        )
        self.metrics_server = metrics_server(self.metrics.registry, settings)
        self.worker = _AgentWorker(self)

    def _split_serving(self, settings: AgentSettings, model: torch.nn.Module, input_shape: tuple[int, ...]) -> tuple[Split | None, BackboneEngine | None]:
        """The model's backbone/head split and the engine serving the backbone (None, None: not split)."""
        if settings.backbone is None or settings.head is None:
            return None, None
        split = split_model(model.to(self.device), backbone=settings.backbone, head=settings.head, input_shape=input_shape)
        engine = build_engine(
            settings.backbone_runtime, split, model_path=settings.backbone_model, providers=settings.onnx_providers,
            delegate=settings.litert_delegate, threads=settings.torch_threads, device=self.device,
        )
        log.info("split serving: backbone %r (%s) on %s, head %r trained", settings.backbone, split.backbone_id, engine.describe(), settings.head)
        return split, engine

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """What the learner is given for a batch ``x``: the backbone's features (once per batch) or ``x`` itself."""
        if self.split is None or self.backbone is None:
            return x
        check_batch(x, self.split.input_shape, self.learner.config.input_range)
        return self.backbone.features(x)

    @staticmethod
    def _make_client(settings: AgentSettings) -> MqttClient:
        return MqttClient.from_url(
            settings.broker,
            client_id=settings.node_id,
            status_node_id=settings.node_id,
            **settings.client_kwargs(),
            max_message_bytes=max(settings.max_batch_bytes, 1 << 20),
            max_blob_bytes=max(64 << 20, settings.max_batch_bytes),
        )

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Subscribe, connect (in the background) and start the worker; returns at once."""
        nid = self.node_id
        # Each topic takes its own message type only, and every limit holds for the message as
        # reassembled from chunks (the bus's defaults for KT and config topics: 1 MiB, 64 KiB).
        self.client.subscribe(topics.node_batch(nid), 1, accept=(RequestBatch,), max_bytes=self.settings.max_batch_bytes)
        self.client.subscribe(topics.node_labels(nid), 1, accept=(Labels,))
        self.client.subscribe(topics.node_kt(nid), 1, accept=(KtRequest,))
        self.client.subscribe(topics.node_config(nid), 1, accept=(ConfigPatch, ConfigRequest))
        self.client.subscribe(topics.fleet_config(), 1, accept=(ConfigPatch,))
        if self.settings.fl is not None:
            self.client.subscribe(topics.fl_global(self.settings.fl.job), 1, accept=(GlobalModel,))
        # Retained, so it goes out on connect: published here rather than on the worker's first
        # tick, which may come before or after the first batch, the metadata sent is the same every run.
        self._maybe_publish_meta()
        if self.metrics_server is not None:
            self.metrics_server.start()
        self.client.start()
        self.worker.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """True once connected and subscribed (the runner then tells systemd READY=1)."""
        if not self.client.wait_connected(timeout) or not self.client.wait_subscribed(timeout or 10.0):
            return False
        self._set_status("serving" if not self.resumed else f"serving (resumed at batch {self.learner.batch_index})")
        self._event("started", resumed=self.resumed, batch=self.learner.batch_index, arch_id=self.learner.arch_id, lineage=self.learner.lineage)
        for refusal in self.checkpoint_refusals:
            self._event("checkpoint_refused", error=refusal[:1000])
        for drop in self.patch_drops:
            self._event("config_refused", source="stored", error=drop[:1000])
        return True

    def liveness(self) -> dict[str, Callable[[], bool]]:
        """The watchdog pings while the MQTT loop runs and the worker loops."""
        return {"mqtt loop": lambda: self.client.loop_alive, "worker": self.worker.alive}

    @property
    def crashed(self) -> BaseException | None:
        return self.worker.crashed

    def status(self) -> str | None:
        return self._status or None

    def reload(self) -> None:
        """SIGHUP (on the runner's thread): the worker re-reads the file between two messages."""
        self._reloaded.clear()
        self._reload.set()
        if not self._reloaded.wait(30.0):
            log.warning("reload still pending after 30 s; the worker will apply it when it can")

    def stop(self) -> None:
        """Stop the worker, write a checkpoint, report counters, disconnect cleanly (status goes offline)."""
        self.worker.stop(timeout=30)
        self.checkpoint()
        self._publish_stats()
        self.client.stop()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        log.info("stopped at batch %d", self.learner.batch_index)

    def stats(self) -> dict[str, float]:
        """Bytes in/out per topic class (real payload sizes) and mean times of each operation, in ms."""
        out: dict[str, float] = {}
        for cls, counts in self.client.byte_counts().items():
            out[f"{cls}_out"] = counts["out"]
            out[f"{cls}_in"] = counts["in"]
        for name, timing in self._timings.items():
            out[f"{name}_ms"] = 1000.0 * timing.mean
            out[f"{name}_n"] = timing.count
        out["served_waiting"] = len(self.served)
        out["served_bytes"] = self.served.nbytes
        out["served_expired"] = self.served.expired_batches
        out["served_expired_samples"] = self.served.expired_samples
        return out

    def _publish_stats(self) -> None:
        try:
            info = self.client.publish_message(
                topics.node_events(self.node_id), Event(node_id=self.node_id, kind="stats", detail=self.stats())
            )
            info.wait(5.0)
        except BusError as exc:
            log.warning("could not publish stats: %s", exc)

    def checkpoint(self) -> None:
        """Write a checkpoint; a refused or failed write is logged and reported, never fatal."""
        self._batches_since_ckpt = 0
        try:
            self.settings.state_dir.mkdir(parents=True, exist_ok=True)
            save_checkpoint(self.settings.checkpoint_path(), self.learner)
        except (CheckpointError, OSError) as exc:
            log.error("checkpoint not written: %s", exc)
            self._event("checkpoint_failed", error=str(exc)[:1000])

    def _set_status(self, text: str) -> None:
        if text != self._status:
            self._status = text
            self.notifier.status(text)

    # -- the worker ------------------------------------------------------------------------------

    def _tick(self) -> None:
        if self._reload.is_set():
            self._reload.clear()
            self._reload_config_file()
            self._reloaded.set()
        self._report_expired()
        self._maybe_publish_meta()

    def _handle(self, item: Inbound | ErrorEvent) -> None:
        is_reply = isinstance(item, ErrorEvent) or (item.message is not None and item.message.is_reply)
        if is_reply and item.corr in self._pending:
            self._on_reply(*self._pending.pop(item.corr), item)
            return
        if isinstance(item, ErrorEvent) and item.context == "timeout":
            return  # a request that is no longer the coordinator's: its flow moved on
        if isinstance(item, ErrorEvent):
            reason = f"{item.context} error on {item.topic or 'the connection'}: {item.error}"
            if item.topic in (topics.node_config(self.node_id), topics.fleet_config()):
                self._ack(ok=False, error=str(item.error)[:1000])
                self._event("config_refused", error=str(item.error)[:1000])
            elif item.context in ("decode", "chunk", "size"):
                self._reject(reason, context=item.context)
            else:
                self._event("error", context=item.context, topic=item.topic or "", error=str(item.error)[:500])
            return
        # Each topic takes only its own message type (the bus checks it too): a KT request slipped
        # onto the batch topic must not make this node publish its model.
        nid = self.node_id
        message = item.message
        if item.topic in (topics.node_config(nid), topics.fleet_config()):
            self._on_config(item)
        elif item.topic == topics.node_batch(nid) and isinstance(message, RequestBatch):
            self._on_batch(item, message)
        elif item.topic == topics.node_labels(nid) and isinstance(message, Labels):
            self._on_labels(item, message)
        elif item.topic == topics.node_kt(nid) and isinstance(message, KtRequest):
            self.responder.handle(item)
        elif self.settings.fl is not None and item.topic == topics.fl_global(self.settings.fl.job) and isinstance(message, GlobalModel):
            self._on_global(message)
        elif message is not None and message.is_reply:
            return  # a late or repeated reply: the bus matched it to a request that has ended
        else:
            kind = message.type if message is not None else "an empty"
            self._reject(f"{kind} message is not accepted on {item.topic}", context="topic")

    def _event(self, kind: str, **detail: Any) -> None:
        clean = {k: (float(v) if isinstance(v, (np.floating,)) else v) for k, v in detail.items()}
        self.metrics.event(kind, clean)
        if kind != "rejected":  # _reject logs its own line
            log.log(_EVENT_LEVELS.get(kind, logging.INFO), "%s %s", kind, _describe(clean))
        try:
            self.client.publish_message(topics.node_events(self.node_id), Event(node_id=self.node_id, kind=kind, detail=clean))
        except BusError as exc:
            log.warning("could not publish %s event: %s", kind, exc)

    def _reject(self, reason: str, **detail: Any) -> None:
        log.warning("rejected: %s", reason)
        self._event("rejected", reason=reason[:1000], **detail)

    # -- request batches -------------------------------------------------------------------------

    def _on_batch(self, item: Inbound, msg: RequestBatch) -> None:
        try:
            x = torch.from_numpy(np.array(msg.x.to_numpy(), dtype=np.float32))
            y = torch.from_numpy(np.array(msg.y.to_numpy(), dtype=np.int64)) if msg.y is not None else None
            indices = np.array(msg.y_indices.to_numpy(), dtype=np.int64) if msg.y_indices is not None else None
            picked = torch.from_numpy(indices) if indices is not None else None
            if y is not None:
                self.learner.check_labels(x.shape[0], y, picked)
            served = self.learner.serve(self._features(x))
            result = self.learner.learn(served, y, picked) if y is not None else served.result
        except (ValueError, RuntimeError, BusError) as exc:
            self._reject(f"batch {msg.batch_id}: {exc}", batch_id=msg.batch_id, context="batch")
            self._answer(item, ErrorReply(code="bad_request", message=f"batch {msg.batch_id}: {exc}"[:1000]))
            return
        self.metrics.served()
        if y is None or (indices is not None and len(indices) < x.shape[0]):
            for batch_id in self.served.put(msg.batch_id, served):
                if batch_id == msg.batch_id:
                    self._event("served_replaced", batch_id=batch_id)
            if y is not None and msg.batch_id in self.served:
                self.served.mark(msg.batch_id, indices)
        # The drift event and the help request go out before the prediction, so a lock-step
        # feeder that sees the prediction already knows a transfer is under way.
        self._after_learning(msg.batch_id, result)
        prediction = self._prediction(msg, served, result)
        self.client.publish_message(topics.node_prediction(self.node_id), prediction, qos=1)
        self._answer(item, prediction)
        if self.settings.fl is not None and (y is not None or self._learnt_since_serve):
            self._maybe_send_update(result.batch_index)
        self._learnt_since_serve = False
        self._batches_since_ckpt += 1
        if self._batches_since_ckpt >= self.knobs.checkpoint_every:
            self.checkpoint()

    def _on_labels(self, item: Inbound, msg: Labels) -> None:
        """Labels of a batch served earlier: learn from them as if they had come with it."""
        y = np.array(msg.y.to_numpy(), dtype=np.int64)
        indices = np.array(msg.indices.to_numpy(), dtype=np.int64) if msg.indices is not None else None
        try:
            result, pending = self.served.learn(self.learner, msg.batch_id, y, indices)
        except (LabelsRefused, ValueError, RuntimeError) as exc:
            self._reject(f"labels for batch {msg.batch_id}: {exc}", batch_id=msg.batch_id, context="labels")
            self._answer(item, ErrorReply(code="rejected", message=f"labels for batch {msg.batch_id}: {exc}"[:1000]))
            return
        self._after_learning(msg.batch_id, result)
        error = result.served_error if result.train_refused is None else None
        self._answer(item, LabelsAck(batch_id=msg.batch_id, learnt=len(y), error=error, pending=pending))

    def _after_learning(self, batch_id: int, result: BatchResult) -> None:
        """What follows a batch served, learnt or both: events, the help coordinator, metadata."""
        self._meta_dirty = True
        self.metrics.learnt(result)
        if result.train_refused is not None:
            self._event("train_rolled_back", batch_id=batch_id, batch=result.batch_index, reason=result.train_refused)
        self._account(result)
        for helper_id in result.promoted:
            # The helper's live branch is the target now; the old target stays pooled as a guard.
            self._event("helper_promoted", helper=helper_id, batch=result.batch_index)
        for helper_id in result.discarded:
            self._event("helper_discarded", helper=helper_id, batch=result.batch_index)
        if result.drift:
            self._set_status(f"drift at batch {result.batch_index}")
        if result.learnt:
            if self.settings.fl is not None:
                self._fl_samples += result.y_hat.shape[0]
            self._learnt_since_serve = True
            pool = self.learner.pool_state()
            now = self.learner.batch_index - 1
            self._carry(self.help.on_batch(now, drift=result.drift_report, dropped=result.dropped, pool=pool))
        # Metadata before the prediction too: a feeder that has every prediction of batch t knows
        # the MdS was sent every node's histogram of batch t.
        self._maybe_publish_meta()

    def _prediction(self, msg: RequestBatch, served: Served, result: BatchResult) -> Prediction:
        k = min(self.knobs.top_k if msg.top_k is None else msg.top_k, self.learner.num_classes)
        top: dict[str, ArrayPayload] = {}
        if k > 0:
            probs, classes = torch.topk(served.served_p.detach().float().cpu(), k, dim=1)
            top = {"top_classes": ArrayPayload.from_numpy(classes.numpy().astype(np.int64)),
                   "top_probs": ArrayPayload.from_numpy(probs.numpy().astype(np.float32))}
        return Prediction(
            batch_id=msg.batch_id,
            y_hat=ArrayPayload.from_numpy(served.result.y_hat.numpy().astype(np.int64)),
            helpers=list(result.helpers),
            error=result.served_error,
            target_error=result.target_error,
            model_version=served.model_version,
            **top,
        )

    def _answer(self, item: Inbound, reply: Envelope) -> None:
        """Answer an application's batch or labels on the reply topic it named, in its own format."""
        reply_to, corr = item.reply_to, item.corr
        if not reply_to:
            return
        if not topics.is_reply_topic(reply_to):
            self._reject(f"{item.topic}: {reply_to[:200]!r} is not a reply topic; no answer sent", context="reply_to")
            return
        if corr and "corr" in type(reply).model_fields:
            reply = reply.evolve(corr=corr)
        props = Properties(PacketTypes.PUBLISH)
        if corr:
            props.CorrelationData = corr.encode("ascii", "replace")
        try:
            if is_json(item.payload):
                self.client.publish(reply_to, encode_app_json(reply), 1, False, topic_class="reply", properties=props)
            else:
                self.client.publish_message(reply_to, reply, 1, topic_class="reply", properties=props)
        except BusError as exc:
            log.warning("could not answer on %s: %s", reply_to, exc)

    def _report_expired(self) -> None:
        """Served batches that expired unlabelled since the last report, as one event (never silently)."""
        expired = self.served.expired_batches
        if expired > self._expired_reported:
            self._event("served_expired", batches=expired - self._expired_reported, total=expired,
                        samples=self.served.expired_samples)
            self._expired_reported = expired

    def _account(self, result: BatchResult) -> None:
        """Fold one batch's timings into the running means that ``stats()`` reports."""
        self._timings["predict"].add(result.timings.get("predict", 0.0))
        if "train" in result.timings:
            self._timings["train"].add(result.timings["train"])
        self._timings["batch"].add(sum(result.timings.values()))

    # -- the FedAvg baseline ---------------------------------------------------------------------

    def _maybe_send_update(self, batch_index: int) -> None:
        fl = self.settings.fl
        round_ = is_round_batch(fl, batch_index)
        if round_ is None or self.node_id not in participants(fl, round_):
            return
        update = model_to_update(self.learner.model, job=fl.job, round=round_, node_id=self.node_id, samples=self._fl_samples)
        self.client.publish_message(topics.fl_update(fl.job, self.node_id), update)
        self._fl_samples = 0
        self._event("fl_sent", round=round_)

    def _on_global(self, msg: GlobalModel) -> None:
        if self.settings.fl is None or msg.job != self.settings.fl.job:
            return
        try:
            apply_global(self.learner.model, msg)
        except FlRejected as exc:
            self._reject(f"global model of round {msg.round}: {exc}", context="global_model")
            return
        self._event("fl_adopted", round=msg.round)

    # -- knowledge transfer as a target ----------------------------------------------------------

    def _help_policy(self) -> HelpPolicy:
        return help_policy(self.learner.config, relay=RELAY if self.knobs.kt_mode == "relay" else None)

    def _carry(self, commands: list[Command]) -> None:
        """Carry the coordinator's commands out; what they report back comes in as more commands."""
        todo = collections.deque(commands)
        while todo:
            command = todo.popleft()
            if isinstance(command, QueryHelpers):
                todo.extend(self._query_helpers(command))
            elif isinstance(command, AskHelper):
                todo.extend(self._ask_helper(command))
            elif isinstance(command, Install):
                todo.extend(self._install(command))
            elif isinstance(command, Status):
                self._set_status(command.text)
            elif command.kind == "rejected":
                self._reject(command.detail["reason"], context="kt_blob")
            else:
                self._event(command.kind, **command.detail)

    def _send_request(self, flow: int, channel: str, request: HelpQuery | KtRequest, timeout: float, retries: int) -> str | None:
        """Send a request of flow ``flow``; its reply comes through the inbox, by correlation id.

        Returns None, or why it could not be sent.
        """
        corr = uuid.uuid4().hex
        self._pending[corr] = (flow, "query" if isinstance(request, HelpQuery) else "kt")
        try:
            self.client.send_request(channel, request.evolve(corr=corr), timeout=timeout, retries=retries, to_inbox=True)
        except (BusError, ValueError) as exc:
            del self._pending[corr]
            return str(exc)
        return None

    def _query_helpers(self, command: QueryHelpers) -> list[Command]:
        query = HelpQuery(
            node_id=self.node_id, arch_id=self.learner.arch_id, lineage=self.learner.lineage,
            classes=list(command.classes), hist=[float(v) for v in self.learner.histogram()], k=command.k,
            cover=command.cover, rank=command.rank,
        )
        error = self._send_request(command.flow, topics.mds_query(), query, self.knobs.mds_timeout, 1)
        if error is None:
            return []
        return self.help.on_candidates(command.flow, None, error=error, pool=self.learner.pool_state())

    def _ask_helper(self, command: AskHelper) -> list[Command]:
        relay = command.helper == RELAY
        request = KtRequest(
            classes=list(command.classes), z=command.z, arch_id=self.learner.arch_id, lineage=self.learner.lineage,
            value_codec=command.value_codec, target=self.node_id if relay else None,
        )
        channel = kt_channel(self.knobs.kt_mode, None if relay else command.helper)
        error = self._send_request(command.flow, channel, request, self.knobs.kt_timeout, 0)
        if error is None:
            return []
        return self.help.on_answer(command.flow, None, error=error, pool=self.learner.pool_state())

    def _install(self, command: Install) -> list[Command]:
        try:
            installed = self.learner.accept_kt_blob(
                command.blob, classes=command.classes, z=command.z, source=command.source, baseline=command.baseline
            )
        except KtRejected as exc:
            return self.help.install_refused(command.flow, str(exc), pool=self.learner.pool_state())
        self._timings["install"].add(installed.seconds)
        self._event(
            "helper_installed",
            helper=command.source,
            helper_id=installed.helper_id,
            classes=list(installed.classes),
            params=installed.count,
            bytes=len(command.blob),
            batches=self.learner.batch_index - command.detected_batch - 1,
            ms=(time.perf_counter() - command.detected_at) * 1000.0,
            pool=len(self.learner.pool),
        )
        self._meta_dirty = True
        return self.help.installed(command.flow, installed.classes, pool=self.learner.pool_state())

    def _on_reply(self, flow: int, asked: str, item: Inbound | ErrorEvent) -> None:
        """A reply (or a timeout) to flow ``flow``'s MdS query or KT request: to the coordinator."""
        pool = self.learner.pool_state()
        message = item.message if isinstance(item, Inbound) else None
        if asked == "query" and isinstance(message, HelperList):
            candidates = [CandidateInfo(c.node_id, tuple(c.classes)) for c in message.candidates]
            self._carry(self.help.on_candidates(flow, candidates, pool=pool))
            return
        if asked == "kt" and isinstance(message, KtBlob):
            self._carry(self.help.on_answer(flow, message.blob, pool=pool))
            return
        if isinstance(item, ErrorEvent):
            error = str(item.error)
        elif isinstance(message, ErrorReply):
            error = str(RemoteError(message))
        else:
            error = f"a {getattr(message, 'type', 'empty')} message is no answer to this request"
        if asked == "query":
            self._carry(self.help.on_candidates(flow, None, error=error, pool=pool))
        else:
            self._carry(self.help.on_answer(flow, None, error=error, pool=pool))

    # -- knowledge transfer as a helper ----------------------------------------------------------

    def _serve_kt(self, request: KtRequest, item: Inbound) -> KtBlob:
        if request.arch_id != self.learner.arch_id:
            raise RequestRejected("arch_mismatch", f"this node runs architecture {self.learner.arch_id}")
        if request.lineage != self.learner.lineage:
            raise RequestRejected("lineage_mismatch", f"this node descends from base {self.learner.lineage}")
        if request.value_codec not in VALUE_CODECS:
            raise RequestRejected("unsupported", f"value codec {request.value_codec!r} is not supported")
        if request.z > self.learner.config.serve_max_z:
            raise RequestRejected("rejected", f"z={request.z} is above this helper's serve_max_z={self.learner.config.serve_max_z}")
        t0 = time.perf_counter()
        try:
            blob = self.learner.kt_blob(request.classes, request.z, request.value_codec)
        except KtRejected as exc:
            raise RequestRejected("rejected", str(exc)) from exc
        self._timings["pick"].add(time.perf_counter() - t0)
        self._event("kt_served", classes=list(request.classes), z=request.z, bytes=len(blob))
        # Over the relay the helper answers the relay; naming itself is harmless there because
        # the relay strips the id, and in direct mode the target asked this node by name.
        return KtBlob(corr=request.corr or item.corr or "none", blob=blob, helper=None)

    # -- metadata --------------------------------------------------------------------------------

    def _maybe_publish_meta(self) -> None:
        now = time.monotonic()
        if not self._meta_dirty or now - self._last_meta < self.knobs.meta_interval:
            return
        hist = self.learner.histogram()
        shares = hist / max(float(hist.sum()), 1.0)
        helpers = len(self.learner.pool)
        if self._published_meta is not None and now - self._last_meta < self.knobs.meta_heartbeat:
            # The MdS ranks helpers by the class shares; a publication that barely moves them
            # would cost every node's bytes and change no ranking.
            last_shares, last_helpers = self._published_meta
            moved = 0.5 * float(np.abs(shares - last_shares).sum())
            if helpers == last_helpers and moved < self.knobs.meta_min_change:
                return
        meta = NodeMeta(
            node_id=self.node_id, arch_id=self.learner.arch_id, lineage=self.learner.lineage,
            hist=[float(v) for v in hist], rolling_error=self.learner.rolling_error(),
            batches=self.learner.batch_index, helpers=helpers,
        )
        self.client.set_retained(topics.node_meta(self.node_id), meta)
        self._last_meta = now
        self._meta_dirty = False
        self._published_meta = (shares, helpers)

    # -- configuration ---------------------------------------------------------------------------

    def _on_config(self, item: Inbound) -> None:
        if not item.payload:
            return  # a cleared retained config
        # The bus decoded it already, under the config topic's limit and accepting config patches
        # (and, on the node's own topic, requests for its config) only.
        patch = item.message
        if isinstance(patch, ConfigRequest):
            if not item.retained:  # a retained request would be answered at every start, to no one
                state = ConfigState(
                    node_id=self.node_id, request_id=patch.msg_id, values=self.config_values(), patched=sorted(self.patches)[:64],
                    settings=reported_settings(self.settings),
                )
                self.client.publish_message(topics.node_config_ack(self.node_id), state)
            return
        patch_id = None
        try:
            if not isinstance(patch, ConfigPatch):
                raise ConfigError(f"expected a config patch, got {getattr(patch, 'type', 'nothing')}")
            patch_id = patch.msg_id
            self.apply_patch(patch.values)
        except (ConfigError, BusError) as exc:
            self._ack(ok=False, error=str(exc)[:1000], patch_id=patch_id)
            self._event("config_refused", error=str(exc)[:1000])
            return
        self._ack(ok=True, applied=self.config_values(), patch_id=patch.msg_id)
        self._event("config_applied", keys=sorted(patch.values)[:64])

    def apply_patch(self, values: dict[str, Any], *, persist: bool = True) -> None:
        """Validate the whole patch, then apply it between batches; ConfigError keeps the old config.

        An applied patch is stored beside the checkpoint (``persist``), so it survives a restart
        and a reload of the settings file.
        """
        new_learner, new_knobs = split_patch(values, self.learner.config, self.knobs)
        stored = merge_patch(self.patches, values) if persist else self.patches
        if persist:
            try:
                write_patches(self.settings.patches_path(), stored)
            except OSError as exc:
                raise ConfigError(f"cannot store the patch, so it would not survive a restart: {exc}") from exc
        self._switch_to(new_learner, new_knobs)
        self.patches = stored

    def _switch_to(self, learner_config: Any, knobs: DaemonKnobs) -> None:
        if learner_config != self.learner.config:
            self.learner.apply_config(learner_config.model_dump())
        self.knobs = knobs
        self.help.configure(self._help_policy())
        # Batches the new bounds push out expire as any other: counted, and reported on the next tick.
        self.served.resize(knobs.served_max_batches, int(knobs.served_max_mb * (1 << 20)))

    def _apply_stored_patches(self, learner_config: Any, knobs: DaemonKnobs) -> list[str]:
        """Lay the stored run-time patches over ``learner_config``/``knobs`` (the settings file's)
        and switch to the result; a stored key that no longer validates is dropped and reported.

        Returns the knobs whose values changed.
        """
        before = self.config_values()
        try:
            stored = read_patches(self.settings.patches_path())
        except ConfigError as exc:
            self.patch_drops.append(str(exc))
            log.error("run-time patches ignored: %s", exc)
            stored = {}
        kept: dict[str, Any] = {}
        for key, value in stored.items():
            try:
                split_patch(merge_patch(kept, {key: value}), learner_config, knobs)
            except ConfigError as exc:
                self.patch_drops.append(f"stored patch of {key!r} dropped: {exc}")
                log.error("stored patch of %r dropped: %s", key, exc)
                continue
            kept = merge_patch(kept, {key: value})
        new_learner, new_knobs = split_patch(kept, learner_config, knobs)
        self._switch_to(new_learner, new_knobs)
        self.patches = kept
        if kept != stored:
            write_patches(self.settings.patches_path(), kept)
        after = self.config_values()
        return sorted(k for k in after if after[k] != before.get(k))

    def config_values(self) -> dict[str, Any]:
        values = self.learner.config.model_dump(mode="json")
        values.update(self.knobs.model_dump(mode="json"))
        return values

    def _ack(self, *, ok: bool, applied: dict | None = None, error: str | None = None, patch_id: str | None = None) -> None:
        ack = ConfigAck(node_id=self.node_id, ok=ok, applied=applied, error=error, patch_id=patch_id)
        self.client.publish_message(topics.node_config_ack(self.node_id), ack)

    def _reload_config_file(self) -> None:
        """SIGHUP: the settings file again, with the run-time patches laid over it."""
        try:
            fresh = load_settings(self.config_file, node_id=self.node_id)
            changed = self._apply_stored_patches(fresh.learner, fresh.daemon)
        except ConfigError as exc:
            log.error("reload refused, old config kept: %s", exc)
            self._event("config_refused", source="reload", error=str(exc)[:1000])
        else:
            self._event("config_applied", source="reload", changed=changed[:64], patched=sorted(self.patches)[:64])
            for drop in self.patch_drops:
                self._event("config_refused", source="stored", error=drop[:1000])
            self.patch_drops.clear()


#: Events an operator must notice in the journal; the rest are logged at INFO.
_EVENT_LEVELS = {
    "help_failed": logging.WARNING,
    "kt_failed": logging.WARNING,
    "config_refused": logging.WARNING,
    "train_rolled_back": logging.WARNING,
    "checkpoint_refused": logging.ERROR,
    "checkpoint_failed": logging.ERROR,
    "error": logging.ERROR,
}


def _describe(detail: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in detail.items())[:2000]


def _parser() -> ServiceArgumentParser:
    p = ServiceArgumentParser(prog="clue-agent", description="CLUE Edge agent: collaborative learning on an edge node over MQTT.")
    p.add_argument("--config", type=Path, help="TOML settings file (then CLUE_* variables, then these flags)")
    p.add_argument("--node-id", help="this node's id")
    p.add_argument("--broker", help="mqtt://host:port, mqtts://host:port or unix:///path")
    p.add_argument("--state-dir", type=Path, help="checkpoint folder")
    p.add_argument("--base-weights", type=Path, help="shared base weights (.safetensors or .npz)")
    p.add_argument("--model", "--arch", dest="model", help="a built-in model or an import path package.module:factory")
    p.add_argument("--num-classes", type=int, help="classes the model outputs")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--runtime", choices=["torch", "onnx"])
    p.add_argument("--torch-threads", type=int)
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def main(argv: list[str] | None = None) -> int:
    """Run `clue-agent` until SIGTERM or SIGINT; return the exit code (`service.exit_codes`)."""
    args = _parser().parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k != "config"}
    try:
        settings = load_settings(args.config, **flags)
    except ConfigError as exc:
        print(f"clue-agent: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings.log_level, identifier="clue-agent")
    notifier = Notifier()
    try:
        daemon = AgentDaemon(settings, config_file=args.config, notifier=notifier)
    except (ConfigError, CheckpointError, BusError, ValueError) as exc:
        # The first line in the journal says why: nothing is logged before the settings are used.
        log.error("cannot start: %s", exc)
        return EXIT_CONFIG
    return run(daemon, name="clue-agent", notifier=notifier)


if __name__ == "__main__":
    sys.exit(main())
