"""The FedAvg baseline: the pure pieces (`agent.fl`) and the aggregator against a real Mosquitto."""

from __future__ import annotations

import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from agent.fl import (
    FlConfig,
    FlRejected,
    apply_global,
    fedavg,
    global_from_tensors,
    is_round_batch,
    model_to_update,
    participants,
)
from agent.models import build_model
from broker import topics
from broker.client import Inbound
from broker.wire import ArrayPayload, GlobalModel, ModelUpdate, NamedArray, decode, encode
from edge_sim.aggregator import FedAvgAggregator
from service.exit_codes import EXIT_CONFIG
from service.metrics import free_port
from support import next_message, scrape, wait_until

MEMBERS = ["edge-0", "edge-1", "edge-2", "edge-3", "edge-4"]


def _cfg(**changes: object) -> FlConfig:
    values: dict[str, object] = {"job": "job1", "every": 5, "members": MEMBERS, "per_round": 3, "seed": 7}
    values.update(changes)
    return FlConfig(**values)


def _update(node: str, samples: int, round: int = 0, job: str = "job1", **arrays: np.ndarray) -> ModelUpdate:
    tensors = global_from_tensors(arrays, job=job, round=round, samples=samples).tensors
    return ModelUpdate(job=job, round=round, node_id=node, tensors=tensors, samples=samples)


class _Small(nn.Module):
    """Parameters and buffers of every kind apply_global must handle (float, int64 counter)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


# --- config and schedule ---------------------------------------------------------------------


def test_config_is_strict() -> None:
    with pytest.raises(ValidationError):
        _cfg(per_round=6)
    with pytest.raises(ValidationError):
        _cfg(members=["a", "a", "b"], per_round=1)
    with pytest.raises(ValidationError):
        _cfg(members=["a/b"], per_round=1)
    with pytest.raises(ValidationError):
        _cfg(every=0)
    with pytest.raises(ValidationError):
        _cfg(extra=1)
    cfg = _cfg()
    with pytest.raises(ValidationError):
        cfg.per_round = 2  # type: ignore[misc]
    assert cfg.members == tuple(MEMBERS)


def test_participants_are_deterministic_and_of_size_n_prime() -> None:
    cfg = _cfg()
    again = FlConfig.model_validate(cfg.model_dump())
    for r in range(50):
        chosen = participants(cfg, r)
        assert chosen == participants(again, r)
        assert len(chosen) == cfg.per_round == len(set(chosen))
        assert set(chosen) <= set(MEMBERS)
    assert participants(_cfg(per_round=5), 3) == MEMBERS
    with pytest.raises(ValueError):
        participants(cfg, -1)


def test_participants_vary_over_rounds_and_cover_every_member() -> None:
    cfg = _cfg(per_round=2)
    draws = [tuple(participants(cfg, r)) for r in range(40)]
    assert len(set(draws)) > 3
    assert {m for d in draws for m in d} == set(MEMBERS)
    other = [tuple(participants(_cfg(per_round=2, seed=8), r)) for r in range(40)]
    assert other != draws


def test_round_batches() -> None:
    cfg = _cfg(every=3)
    assert [is_round_batch(cfg, i) for i in range(7)] == [None, None, 0, None, None, 1, None]
    assert [is_round_batch(_cfg(every=1), i) for i in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError):
        is_round_batch(cfg, -1)


# --- the average -----------------------------------------------------------------------------


def test_fedavg_is_the_sample_weighted_mean() -> None:
    a = _update("edge-0", 1, w=np.array([1.0, 2.0], np.float32), n=np.array(5, np.int64))
    b = _update("edge-1", 3, w=np.array([3.0, 6.0], np.float32), n=np.array(9, np.int64))
    out = fedavg([a, b])
    assert list(out) == ["w", "n"]
    assert out["w"].dtype == np.float32 and out["w"].tolist() == [2.5, 5.0]
    assert out["n"].dtype == np.int64 and out["n"].shape == () and out["n"] == 9  # counters take the maximum
    zero = fedavg([_update("edge-0", 0, w=np.array([1.0], np.float32)), _update("edge-1", 0, w=np.array([2.0], np.float32))])
    assert zero["w"].tolist() == [1.5]  # no samples anywhere: the plain mean


def test_fedavg_refuses_updates_that_do_not_fit() -> None:
    base = _update("edge-0", 1, w=np.zeros(2, np.float32))
    for other in (
        _update("edge-1", 1, v=np.zeros(2, np.float32)),
        _update("edge-1", 1, w=np.zeros(2, np.float32), v=np.zeros(1, np.float32)),
        _update("edge-1", 1, w=np.zeros(3, np.float32)),
        _update("edge-1", 1, w=np.zeros(2, np.float64)),
        _update("edge-1", 1, round=1, w=np.zeros(2, np.float32)),
        _update("edge-1", 1, job="job2", w=np.zeros(2, np.float32)),
    ):
        with pytest.raises(FlRejected):
            fedavg([base, other])
    with pytest.raises(FlRejected):
        fedavg([])


# --- models <-> messages ---------------------------------------------------------------------


def test_update_round_trips_every_state_entry() -> None:
    model = _Small()
    update = model_to_update(model, job="job1", round=2, node_id="edge-0", samples=40)
    back = decode(encode(update), expect=ModelUpdate)
    assert [t.name for t in back.tensors] == list(model.state_dict())
    for t in back.tensors:
        assert np.array_equal(t.array.to_numpy(), model.state_dict()[t.name].numpy())
    assert (back.round, back.samples) == (2, 40)


def test_apply_global_loads_exactly() -> None:
    source, target = _Small(), _Small()
    with torch.no_grad():
        source.bn.running_mean.add_(1.5)
        source.bn.num_batches_tracked.fill_(7)
    tensors = {k: v.numpy() for k, v in source.state_dict().items()}
    msg = decode(encode(global_from_tensors(tensors, job="job1", round=0, samples=10)), expect=GlobalModel)
    apply_global(target, msg)
    assert _same(_state(target), _state(source))


def _forged(model: nn.Module, name: str, array: np.ndarray, *, drop: str | None = None) -> GlobalModel:
    """A global model with one entry replaced, built without validation (as a buggy sender might)."""
    tensors = []
    for k, v in model.state_dict().items():
        if k == drop:
            continue
        arr = array if k == name else v.numpy()
        payload = ArrayPayload.model_construct(dtype=arr.dtype.name, shape=list(arr.shape), data=arr.tobytes())
        tensors.append(NamedArray.model_construct(name=k, array=payload))
    if name not in model.state_dict():
        payload = ArrayPayload.model_construct(dtype=array.dtype.name, shape=list(array.shape), data=array.tobytes())
        tensors.append(NamedArray.model_construct(name=name, array=payload))
    return GlobalModel.model_construct(job="job1", round=0, tensors=tensors, samples=1, v=1, type="fl.global")


@pytest.mark.parametrize(
    "name, array, drop",
    [
        ("fc.weight", np.full((3, 4), np.nan, np.float32), None),
        ("bn.running_var", np.array([1.0, np.inf, 1.0], np.float32), None),
        ("fc.weight", np.zeros((4, 3), np.float32), None),
        ("fc.weight", np.zeros((3, 4), np.float64), None),
        ("bn.num_batches_tracked", np.array(3, np.int32), None),
        ("fc.bias", np.zeros(3, np.float32), "fc.weight"),
        ("extra", np.zeros(1, np.float32), None),
    ],
    ids=["nan", "inf-buffer", "shape", "param-dtype", "buffer-dtype", "missing", "unexpected"],
)
def test_apply_global_refuses_and_leaves_the_model_unchanged(name: str, array: np.ndarray, drop: str | None) -> None:
    model = _Small()
    before = _state(model)
    with pytest.raises(FlRejected):
        apply_global(model, _forged(_Small(), name, array, drop=drop))
    assert _same(_state(model), before)


def test_non_float32_models_are_refused() -> None:
    with pytest.raises(FlRejected):
        model_to_update(_Small().double(), job="job1", round=0, node_id="edge-0", samples=1)


# --- the aggregator over a real broker -------------------------------------------------------


def _aggregator_and_listener(mosquitto, make_client, job: str, cfg: FlConfig, **kwargs: object):
    agg_client = make_client(mosquitto, client_id=f"{job}-agg", start=False)
    aggregator = FedAvgAggregator(agg_client, cfg, **kwargs).start()  # type: ignore[arg-type]
    agg_client.start()
    listener = make_client(mosquitto, client_id=f"{job}-listen", start=False)
    listener.subscribe(topics.fl_global(job))
    listener.start()
    assert agg_client.wait_subscribed(10) and listener.wait_subscribed(10)
    return aggregator, agg_client, listener


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_aggregator_averages_chunked_mlp_updates(mosquitto, make_client, unique_id: str) -> None:
    job = unique_id[:40]
    cfg = FlConfig(job=job, every=1, members=["a", "b", "c", "d"], per_round=3, seed=1)
    chosen = participants(cfg, 0)
    outsider = next(m for m in cfg.members if m not in chosen)
    aggregator, agg_client, listener = _aggregator_and_listener(mosquitto, make_client, job, cfg, round_timeout=30.0)
    try:
        models = {m: build_model("mlp4", 10, seed=i) for i, m in enumerate(cfg.members)}
        samples = {m: 100 * (i + 1) for i, m in enumerate(cfg.members)}
        nodes = {m: make_client(mosquitto, client_id=f"{job}-{m}") for m in cfg.members}
        assert all(c.wait_connected(10) for c in nodes.values())
        sizes = {}
        # The outsider goes first, so the round cannot close before it is seen and ignored.
        for m in [outsider, *chosen]:
            update = model_to_update(models[m], job=job, round=0, node_id=m, samples=samples[m])
            sizes[m] = len(encode(update))
            published = nodes[m].publish_message(topics.fl_update(job, m), update)
            assert len(published.infos) > 1  # ~1.9 MB: chunked by the client
            assert published.wait(10)

        received = next_message(listener, GlobalModel, timeout=20)
        assert (received.job, received.round, received.samples) == (job, 0, sum(samples[m] for m in chosen))
        model = build_model("mlp4", 10, seed=99)
        apply_global(model, received)
        total = sum(samples[m] for m in chosen)
        for name, tensor in model.state_dict().items():
            want = sum(samples[m] / total * models[m].state_dict()[name].double() for m in chosen)
            assert torch.allclose(tensor.double(), want, atol=1e-6), name

        # The listener can see the global model before the aggregator's worker has counted it.
        wait_until(
            lambda: aggregator.stats()["ignored_non_participant"] == 1 and aggregator.stats()["rounds_published"] == 1,
            20, what="the outsider ignored and the round published",
        )
        stats = aggregator.stats()
        assert stats["rounds_published"] == 1 and stats["rounds_partial"] == 0
        assert stats["updates_used"] == 3 and stats["updates_ignored"] == 1 and stats["last_round"] == 0
        for m in cfg.members:
            assert nodes[m].byte_counts()["fl"]["out"] >= sizes[m]
        assert agg_client.byte_counts()["fl"]["in"] >= sum(sizes.values())
        assert agg_client.byte_counts()["fl"]["out"] >= len(encode(received))
        assert listener.byte_counts()["fl"]["in"] >= len(encode(received))
    finally:
        aggregator.stop()


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_aggregator_times_out_and_ignores_stale_duplicate_and_mismatched(mosquitto, make_client, unique_id: str) -> None:
    job = unique_id[:40]
    cfg = FlConfig(job=job, every=1, members=["a", "b", "c"], per_round=3)
    aggregator, agg_client, listener = _aggregator_and_listener(mosquitto, make_client, job, cfg, round_timeout=3.0)
    try:
        node = {m: make_client(mosquitto, client_id=f"{job}-{m}") for m in cfg.members}
        assert all(c.wait_connected(10) for c in node.values())

        def send(m: str, round: int, samples: int, **arrays: np.ndarray) -> None:
            assert node[m].publish_message(topics.fl_update(job, m), _update(m, samples, round, job, **arrays)).wait(10)

        w = np.array([1.0, 3.0], np.float32)
        send("a", 0, 1, w=w)
        send("a", 0, 1, w=w * 100)  # a redelivery must not count twice
        send("b", 0, 3, w=w * 3)
        send("c", 0, 5, w=np.zeros(3, np.float32))  # another shape
        first = next_message(listener, GlobalModel, timeout=20)  # c's update does not fit: the round closes on its deadline
        assert first.round == 0 and [t.array.to_numpy().tolist() for t in first.tensors] == [[2.5, 7.5]]

        send("c", 0, 1, w=w)  # round 0 is over
        send("a", 2, 1, w=w)
        send("b", 2, 1, w=w)
        send("c", 2, 2, w=w * 4)
        assert next_message(listener, GlobalModel, timeout=20).round == 2
        wait_until(
            lambda: aggregator.stats()["ignored_stale"] == 1 and aggregator.stats()["rounds_published"] == 2,
            20, what="the stale update ignored and the second round published",
        )
        stats = aggregator.stats()
        assert stats["rounds_published"] == 2 and stats["rounds_partial"] == 1
        assert (stats["ignored_duplicate"], stats["ignored_mismatch"], stats["updates_used"]) == (1, 1, 5)
        assert stats["open_rounds"] == 0
    finally:
        aggregator.stop()


def test_cli_refuses_a_bad_configuration() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "edge_sim.aggregator", "--job", "j", "--every", "1", "--members", "a,b", "--per-round", "3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == EXIT_CONFIG, proc.stderr
    assert "per_round" in proc.stderr


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_cli_serves_until_sigterm(mosquitto, make_client, unique_id: str) -> None:
    job = unique_id[:40]
    metrics_port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_sim.aggregator", "--broker", mosquitto.url, "--job", job, "--every", "2",
         "--members", "a,b", "--per-round", "2", "--log-level", "INFO", "--metrics-port", str(metrics_port)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        listener = make_client(mosquitto, client_id=f"{job}-listen", start=False)
        listener.subscribe(topics.fl_global(job))
        listener.start()
        nodes = {m: make_client(mosquitto, client_id=f"{job}-{m}") for m in ("a", "b")}
        assert listener.wait_subscribed(10) and all(c.wait_connected(10) for c in nodes.values())
        received = None
        # Updates sent before the process has subscribed are lost: send a fresh round until one lands.
        for round in range(40):
            for m, samples in (("a", 1), ("b", 3)):
                update = _update(m, samples, round, job, w=np.array([4.0 * samples], np.float32))
                assert nodes[m].publish_message(topics.fl_update(job, m), update).wait(10)
            item = listener.get(timeout=0.5)
            if isinstance(item, Inbound) and isinstance(item.message, GlobalModel):
                received = item.message
                break
        assert received is not None, "the aggregator process published nothing"
        assert received.tensors[0].array.to_numpy().tolist() == [10.0]  # (1*4 + 3*12) / 4
        metrics = wait_until(lambda: (m := scrape(f"http://127.0.0.1:{metrics_port}/metrics"))['clue_aggregator_rounds_total{outcome="full"}'] >= 1 and m,
                             10, what="the published round in the aggregator's metrics")
        assert metrics["clue_aggregator_mqtt_connected"] == 1.0
        assert metrics['clue_aggregator_updates_total{outcome="accepted"}'] >= 2
        assert metrics['clue_aggregator_mqtt_payload_bytes_total{direction="out",topic_class="fl"}'] > 0
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "published the average of 2 updates" in err
