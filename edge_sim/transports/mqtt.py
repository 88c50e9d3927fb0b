"""The MQTT transport: real ``clue-agent`` and ``clue-mds`` processes over a real Mosquitto.

For each seed and mode it starts N agents from one shared base model, feeds every node its
request batches (lock-step by default: batch t goes to the peers, then to the target, and batch
t+1 goes out once every node answered batch t and finished the KT or FedAvg round it started, so a
seed gives the same numbers every run), records predictions, events and the byte counts the
agents' MQTT clients measured, and stops them. ``feed_external`` plays a scenario to agents
someone else runs.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from agent.backbone import split_model
from agent.errors import ConfigError
from agent.export import ExportRefused, export_backbone
from agent.fl import FlConfig, is_round_batch
from agent.models import save_weights
from broker.client import MqttClient
from broker.launcher import PrivateMosquitto
from edge_sim.collector import Collector, Feeder
from edge_sim.inputs import LabelledData, LabelPlan, RequestFeed, SeedInputs, prepare_seed, scenario_data, scenario_model
from edge_sim.modes import FEDAVG, learner_values
from edge_sim.processes import Child, spawn, spawn_agent, spawn_mds
from edge_sim.records import ModeRun, NodeRecord, node_ids
from edge_sim.scenario import Scenario
from edge_sim.transports.base import Progress


def agent_settings(scn: Scenario, mode: str, members: list[str], seed: int, num_classes: int) -> dict[str, Any]:
    """Agent settings for one mode over ``num_classes`` classes: the scenario's model and knobs, then the mode's own.

    The input shape is always given, a built-in's too, so every agent checks the batches it is sent.
    """
    daemon = {"meta_interval": 0.0, "meta_heartbeat": 86_400.0, "checkpoint_every": 1_000_000, "kt_timeout": 20.0}
    daemon.update(scn.daemon)
    spec = scn.model_spec()
    settings: dict[str, Any] = {
        "learner": learner_values(scn.learner, mode), "daemon": daemon, "model": spec.model, "model_args": spec.model_args,
        "input_shape": list(spec.sample_shape()), "num_classes": num_classes,
    }
    if spec.trainable is not None:
        settings["trainable"] = list(spec.trainable)
    if scn.backbone is not None:
        settings.update(backbone=scn.backbone, head=scn.head, backbone_runtime=scn.backbone_runtime)
    if mode == FEDAVG:
        settings["fl"] = {
            "job": f"fl-s{seed}", "every": scn.fedavg.every, "members": members,
            "per_round": scn.fedavg.per_round, "seed": seed,
        }
    return settings


class Fleet:
    """The processes and clients of one simulator run (broker, MdS, observer); closes them all.

    ``tls`` (``tls_ca``, ``tls_cert``, ``tls_key``) is the identity that feeds and, without
    ``collector_tls``, reads too; under the fleet ACL feeding and reading are two identities
    (``feeder``, ``collector``), so ``collector_tls`` makes a second client that reads.
    """

    def __init__(
        self, workdir: Path, broker_url: str | None, *, start_mds: bool = True,
        tls: Mapping[str, str] | None = None, collector_tls: Mapping[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self._stack = contextlib.ExitStack()
        if broker_url is None:
            # A simulation needs no durability: persistence would write the database on every message.
            self.broker = self._stack.enter_context(PrivateMosquitto(persistence=False))
            broker_url = f"mqtt://{self.broker.host}:{self.broker.port}"
        self.broker_url = broker_url
        self.children: list[Child] = []
        if start_mds:
            self.children.append(spawn_mds(broker_url, workdir / "mds.db", workdir / "logs"))
        self.client = sim_client(broker_url, "clue-sim", tls)
        reader = sim_client(broker_url, "clue-sim-collector", collector_tls) if collector_tls else self.client
        self.collector = Collector(reader).start()
        self.status = self.collector.status
        self.feeder = Feeder(self.client, self.collector)
        self._clients = [self.client] + ([reader] if reader is not self.client else [])
        try:
            for client in self._clients:
                client.start()
            for client in self._clients:
                if not client.wait_subscribed(30):
                    raise RuntimeError(f"{client.name}: cannot connect to the broker at {broker_url} ({client.last_refusal or 'no answer'})")
                if client.stats()["subscribe_refused"]:
                    raise RuntimeError(f"{client.name}: the broker refused its subscriptions (see its ACL)")
        except BaseException:
            self.close()
            raise

    def wait_status(self, predicate: Callable[[], bool], timeout: float) -> bool:
        return self.collector.wait_for(predicate, timeout)

    def close(self) -> None:
        for child in self.children:
            child.terminate(15)
        self.collector.stop()
        for client in self._clients:
            client.stop()
        self._stack.close()


def sim_client(broker_url: str, name: str, tls: Mapping[str, str] | None = None) -> MqttClient:
    """A client of the simulator: a clean session the broker drops 1 s after it goes.

    The simulator's clients are one-shot. A persistent session (the agents' 3600 s) would queue
    every prediction and event of the fleet for a run long over, up to the broker's queue limit,
    each message one more save of a database saved on every change. ``MqttClient`` refuses a
    session expiry of 0, so 1 s. The id, not a node id (the colons), makes the client subscribe
    to no node's reply topic.
    """
    client_id = f"{name}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    return MqttClient.from_url(broker_url, client_id=client_id, name=name, clean_start=True, session_expiry=1, **(tls or {}))


class MqttTransport:
    """Scenarios over MQTT: a private Mosquitto (or ``broker_url``) and an MdS, kept across modes.

    ``workdir`` holds the logs, the agents' state, the MdS database and each seed's base model.
    """

    name = "mqtt"

    def __init__(self, workdir: Path, broker_url: str | None = None) -> None:
        self.fleet = Fleet(workdir, broker_url)
        self._base_paths: dict[int, Path] = {}
        self._backbones: dict[int, Path] = {}

    def run_mode(self, scn: Scenario, mode: str, inputs: SeedInputs, progress: Progress | None = None) -> ModeRun:
        base_path = self._base_paths.get(inputs.seed)
        if base_path is None:
            base_path = self.fleet.workdir / f"base-s{inputs.seed}.npz"
            save_weights(base_path, inputs.base)
            self._base_paths[inputs.seed] = base_path
        backbone = self._backbones.get(inputs.seed)
        if backbone is None and scn.backbone_runtime != "torch":
            backbone = self._backbones[inputs.seed] = export_seed_backbone(scn, inputs, self.fleet.workdir)
        return _play(self.fleet, scn, mode, inputs.seed, inputs.data, base_path, inputs.rest, progress, backbone_model=backbone)

    def close(self) -> None:
        self.fleet.close()


def export_seed_backbone(scn: Scenario, inputs: SeedInputs, workdir: Path) -> Path:
    """The seed's base backbone exported int8 for ``scn.backbone_runtime``, calibrated on pre-training rows.

    ConfigError when the export is refused (it changes the head's accuracy by more than a point).
    """
    num_classes = inputs.data.num_classes
    model = scenario_model(scn, num_classes)
    model.load_state_dict(inputs.base)
    assert scn.backbone is not None and scn.head is not None
    split = split_model(model.eval(), backbone=scn.backbone, head=scn.head, input_shape=scn.model_spec().sample_shape())
    rows = inputs.pre if inputs.pre is not None else inputs.rest
    pick = np.random.default_rng(inputs.seed).permutation(rows)[: scn.calibration_samples]
    suffix = ".onnx" if scn.backbone_runtime == "onnxruntime" else ".tflite"
    path = workdir / f"backbone-s{inputs.seed}.int8{suffix}"
    target = {"onnx": path} if suffix == ".onnx" else {"tflite": path}
    try:
        export_backbone(split, inputs.data.x[pick], inputs.data.y[pick], **target)
    except ExportRefused as exc:
        raise ConfigError(f"{scn.name}: seed {inputs.seed}: {exc}") from exc
    return path


def _python_path_env(scn: Scenario) -> dict[str, str]:
    """The agents' PYTHONPATH: the scenario's ``python_path`` before what this process was given."""
    if not scn.python_path:
        return {}
    paths = [str(p) for p in scn.python_path]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return {"PYTHONPATH": os.pathsep.join(paths)}


def _per_class(y: np.ndarray, y_hat: np.ndarray) -> dict[int, float]:
    return {int(c): float((y_hat[y == c] != c).mean()) for c in np.unique(y)}


def _play(
    fleet: Fleet, scn: Scenario, mode: str, seed: int, data: LabelledData, base_path: Path | None,
    rest: np.ndarray, progress: Progress | None = None, *, external: list[str] | None = None, backbone_model: Path | None = None,
) -> ModeRun:
    if external is not None:
        ids, settings, agents = list(external), {}, []
        if len(ids) != scn.nodes:
            raise ValueError(f"the scenario has {scn.nodes} nodes, {len(ids)} were named")
    else:
        ids = node_ids(seed, mode, scn.nodes)
        settings = agent_settings(scn, mode, ids, seed, data.num_classes)
        settings["base_weights"] = str(base_path)
        if backbone_model is not None:
            settings["backbone_model"] = str(backbone_model)
        state = fleet.workdir / "state" / f"s{seed}-{mode}"
        shutil.rmtree(state, ignore_errors=True)
        env = _python_path_env(scn)
        agents = [spawn_agent(n, fleet.broker_url, state, fleet.workdir / "logs", settings=settings, env=env) for n in ids]
    aggregator = None
    if mode == FEDAVG:
        fl = settings["fl"]
        aggregator = spawn(
            f"aggregator-s{seed}", [sys.executable, "-m", "edge_sim.aggregator", "--broker", fleet.broker_url,
             "--job", fl["job"], "--every", str(fl["every"]), "--members", ",".join(ids),
             "--per-round", str(fl["per_round"]), "--seed", str(seed)],
            fleet.workdir / "logs",
        )
    collector = fleet.collector
    started = time.perf_counter()
    nodes = {n: NodeRecord() for n in ids}
    labels: dict[tuple[str, int], np.ndarray] = {}
    complete = False
    try:
        if external is not None:
            online = lambda: all(fleet.status.get(n) == b"online" for n in ids)  # noqa: E731
            if not fleet.wait_status(online, 600):
                raise RuntimeError(f"agents {ids} did not come online")
        elif not collector.wait_for(lambda: all(collector.events_of(n, "started") for n in ids), 120):
            dead = [a.name for a in agents if not a.alive()]
            raise RuntimeError(f"agents did not start (dead: {dead}); see {fleet.workdir / 'logs'}")
        feed = RequestFeed(scn, seed, data, rest)
        plan = LabelPlan(scn, seed)
        for t in range(scn.batches):
            requests = feed.batch(t)
            sent: list[tuple[str, np.ndarray, np.ndarray | None, np.ndarray | None]] = []
            learnt_now: set[int] = set()
            if plan.inline:
                sent = [(node, r.x, r.y if r.labelled else None, None) for node, r in zip(ids, requests)]
                learnt_now = {i for i, r in enumerate(requests) if r.labelled}
            else:
                # Labels that come before this batch, then the batch with those that ride in it.
                for late in plan.due(t):
                    fleet.feeder.send_labels(ids[late.node], late.batch, late.y, late.indices)
                    learnt_now.add(late.node)
                riding = {late.node: late for late in plan.plan(t, requests)}
                learnt_now |= set(riding)
                sent = [
                    (node, r.x, riding[i].y if i in riding else None, riding[i].indices if i in riding else None)
                    for i, (node, r) in enumerate(zip(ids, requests))
                ]
            for node, request in zip(ids, requests):
                labels[(node, t)] = request.y
            if scn.pacing == "lockstep":
                # The peers first, then the target: when the target asks the MdS, every peer's
                # histogram of this batch is already there, so the helper it gets does not depend
                # on which process ran faster, and a seed gives the same numbers every run.
                # A round falls on this batch only if a participant had labels to learn from by now.
                fl_round = _fl_round(settings, t) if learnt_now else None
                ok = fleet.feeder.step(t, sent[1:], timeout=180) and fleet.feeder.step(
                    t, sent[:1], timeout=180, extra=_fl_done(collector, ids, fl_round)
                )
                if not ok:
                    raise RuntimeError(f"batch {t} was not answered in time; see {fleet.workdir / 'logs'}")
            else:
                for node, bx, by, bi in sent:
                    fleet.feeder.send(node, t, bx, by, bi)
                time.sleep(1.0 / scn.rate)
            if progress:
                progress(f"seed {seed} {mode}", t + 1, scn.batches)
        if scn.pacing == "free":
            collector.wait_for(lambda: all(len(collector.predictions[n]) >= scn.batches for n in ids), 120)
        complete = True
    finally:
        for agent in agents:
            agent.process.send_signal(signal.SIGTERM)
        if agents:
            collector.wait_for(lambda: all(collector.events_of(n, "stats") for n in ids), 60)
        for agent in agents:
            agent.terminate(20)
        if aggregator is not None:
            aggregator.terminate(10)
    _collect(collector, nodes, ids, scn.batches, labels)
    return ModeRun(mode=mode, seed=seed, nodes=nodes, seconds=time.perf_counter() - started, complete=complete, num_classes=data.num_classes)


def _fl_round(settings: dict[str, Any], t: int) -> int | None:
    """The FedAvg round that closes after batch ``t`` (the agents' own rule), if any."""
    fl = settings.get("fl")
    return is_round_batch(FlConfig.model_validate(fl), t) if fl else None


def _fl_done(collector: Collector, ids: list[str], fl_round: int | None) -> Callable[[], bool]:
    if fl_round is None:
        return lambda: True
    return lambda: all(
        any(e.detail.get("round") == fl_round for e in collector.events_of(n, "fl_adopted")) for n in ids
    )


def _collect(
    collector: Collector, nodes: dict[str, NodeRecord], ids: list[str], batches: int,
    labels_sent: dict[tuple[str, int], np.ndarray],
) -> None:
    for node in ids:
        rec = nodes[node]
        preds = collector.predictions[node]
        for t in range(batches):
            p = preds.get(t)
            labels = labels_sent.get((node, t))
            if p is None or labels is None:
                rec.served_error.append(math.nan)
                rec.target_error.append(math.nan)
                rec.class_errors.append({})
                rec.helpers.append(0)
                continue
            # The sim knows every label it sent, so errors are computed here for unlabelled batches too.
            rec.served_error.append(float((p.y_hat.to_numpy() != labels).mean()))
            rec.target_error.append(float(p.target_error) if p.target_error is not None else math.nan)
            rec.class_errors.append(_per_class(labels, p.y_hat.to_numpy()))
            rec.helpers.append(len(p.helpers))
        rec.events = [{"kind": e.kind, **e.detail} for e in collector.events_of(node) if e.kind != "stats"]
        stats = collector.events_of(node, "stats")
        rec.stats = dict(stats[-1].detail) if stats else {}


@contextlib.contextmanager
def _workdir(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="clue-sim-") as tmp:
        yield Path(tmp)


@contextlib.contextmanager
def mqtt_transport(workdir: Path | None, broker_url: str | None) -> Iterator[MqttTransport]:
    """An ``MqttTransport`` in ``workdir`` (None: a temporary folder, removed after)."""
    with _workdir(workdir) as wd:
        transport = MqttTransport(wd, broker_url)
        try:
            yield transport
        finally:
            transport.close()


def feed_external(
    scn: Scenario, broker_url: str, ids: list[str], *, progress: Progress | None = None, workdir: Path | None = None,
    tls: Mapping[str, str] | None = None, collector_tls: Mapping[str, str] | None = None,
) -> ModeRun:
    """Play the scenario's workload (first seed) to agents someone else runs, e.g. a compose fleet.

    Node i of ``ids`` is workload node i (node 0 the target). Their base model must be the one
    ``clue-sim base`` wrote for the same scenario, so the data split matches. ``tls`` and
    ``collector_tls``: as for ``Fleet``.
    """
    data = scenario_data(scn)
    seed = scn.seeds[0]
    rest = prepare_seed(scn, seed, data).rest
    with _workdir(workdir) as wd:
        fleet = Fleet(wd, broker_url, start_mds=False, tls=tls, collector_tls=collector_tls)
        try:
            return _play(fleet, scn, "external", seed, data, None, rest, progress, external=ids)
        finally:
            fleet.close()
