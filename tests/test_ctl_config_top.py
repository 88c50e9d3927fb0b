"""``clue-ctl config NODE`` and ``clue-ctl top`` against a running fleet of real agents, as an
operator runs them: ``config`` asks the agent itself (a versioned `ConfigRequest`, answered by a
`ConfigState`); ``top`` runs in a pseudo-terminal and its screen is read back."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

import pytest

from agent.settings import load_settings, reported_settings
from broker import ctl, topics
from broker.client import Inbound
from broker.wire import ConfigAck, ConfigState
from service.metrics import free_port
from support.fleet import Clusters, patch_and_ack, wait_online

pytestmark = [pytest.mark.integration]

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _ctl(fleet, *argv: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "broker.ctl", "-h", fleet.broker.host, "-p", str(fleet.broker.port), *argv],
        capture_output=True, text=True, timeout=timeout,
    )


def test_reported_settings_never_carry_a_password(tmp_path):
    secret = tmp_path / "mqtt.pw"
    secret.write_text("hunter2\n")
    settings = load_settings(None, node_id="n1", broker="mqtt://edge:hunter2@broker.lan:1883", username="edge", password_file=str(secret))
    reported = reported_settings(settings)
    assert reported["password_file"] == "(set)" and reported["tls_key_password_file"] is None
    assert reported["broker"] == "mqtt://edge:***@broker.lan:1883"
    assert "hunter2" not in json.dumps(reported)
    assert "learner" not in reported and "daemon" not in reported
    ConfigState(node_id="n1", request_id="r1", values={}, settings=reported)  # it fits the wire message


@pytest.mark.timeout(120)
def test_config_prints_what_the_node_runs_now(fleet):
    node, port = "cfg-edge", free_port()
    child = fleet.agent(node, metrics_port=port)
    wait_online(fleet, [node])
    assert _ctl(fleet, "set", "z=0.3", "--node", node).returncode == ctl.EXIT_OK

    done = _ctl(fleet, "config", node)
    assert done.returncode == ctl.EXIT_OK, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    print(done.stdout)
    assert lines[0] == f"{node}: run-time knobs (* set by a run-time patch; clue-ctl set changes them)"
    assert " * z = 0.3" in lines
    assert "   kt_mode = \"direct\"" in lines
    assert f"   metrics_port = {port}" in lines and f'   node_id = "{node}"' in lines

    as_json = json.loads(_ctl(fleet, "config", node, "--json").stdout)
    assert as_json["type"] == "config.state" and as_json["v"] == 1
    assert as_json["values"]["z"] == 0.3 and as_json["patched"] == ["z"]
    assert as_json["settings"]["broker"] == fleet.broker_url
    assert child.alive()


@pytest.mark.timeout(120)
def test_a_malformed_config_request_is_refused_and_the_agent_serves_on(fleet):
    node = "cfg-bad"
    child = fleet.agent(node)
    wait_online(fleet, [node])
    client = fleet.client()
    client.subscribe(topics.node_config_ack(node), 1)
    assert client.wait_subscribed(10)
    ack = patch_and_ack(fleet, client, node, '{"v": 1, "type": "config.request", "node": "x"}')
    assert isinstance(ack, ConfigAck) and not ack.ok and "node" in ack.error
    done = _ctl(fleet, "config", node, "--timeout", "20")
    assert done.returncode == ctl.EXIT_OK and child.alive(), done.stderr


@pytest.mark.timeout(60)
def test_config_of_a_node_that_does_not_answer_exits_3(fresh_mosquitto):
    done = subprocess.run(
        [sys.executable, "-m", "broker.ctl", "-h", fresh_mosquitto.host, "-p", str(fresh_mosquitto.port), "config", "nobody", "--timeout", "1"],
        capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == ctl.EXIT_TIMEOUT
    assert "nobody did not answer within 1 s" in done.stderr


def _run_in_terminal(argv: list[str], columns: int = 150, rows: int = 30) -> tuple[subprocess.Popen, int]:
    """`argv` with its stdout on a pseudo-terminal of `columns` × `rows`; returns it and the master end."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(columns), "LINES": str(rows)}
    process = subprocess.Popen(argv, stdout=slave, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
    os.close(slave)
    return process, master


def _read_screen(master: int, until: float, stop) -> str:
    chunks = []
    while time.monotonic() < until and not stop(b"".join(chunks)):
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunks.append(os.read(master, 65536))
            except OSError:  # the process closed its end
                break
    return b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_top_shows_the_live_fleet_and_redraws_in_place(fleet):
    fleet.mds()
    nodes = ["top-target", "top-helper"]
    for node in nodes:
        fleet.agent(node)
    feeder, collector = fleet.observer()
    wait_online(fleet, nodes)
    data = Clusters()

    def step(t: int, drifted: bool) -> None:
        target_classes = list(range(8)) + ([8, 9] * 2 if drifted else [])
        batches = [("top-target", *data.batch(target_classes)), ("top-helper", *data.batch(range(10)))]
        assert feeder.step(t, batches, timeout=60), f"batch {t} not answered"

    for t in range(6):
        step(t, drifted=False)
    frames = 8
    process, master = _run_in_terminal(
        [sys.executable, "-m", "broker.ctl", "-h", fleet.broker.host, "-p", str(fleet.broker.port), "top", "--interval", "1", "--count", str(frames)]
    )
    try:
        # The first frame: both nodes online, from retained status and metadata.
        first = _read_screen(master, time.monotonic() + 30, lambda b: b.count(b"top-helper") >= 1 and b.count(b"top-target") >= 1)
        assert "top-target" in first, first
        for t in range(6, 12):
            step(t, drifted=True)
        screen = first + _read_screen(master, time.monotonic() + 60, lambda b: False)
        assert process.wait(30) == 0, process.stderr.read().decode() if process.stderr else ""
    finally:
        os.close(master)
    # Refreshed in place: the cursor goes back up over the table rather than scrolling a new one.
    assert re.search(r"\x1b\[\d*A", screen), "no cursor-up: the table was not redrawn in place"
    last = ANSI.sub("", screen).split("clue-ctl top")[-1]
    print("clue-ctl top" + last)
    rows = {line.split()[0]: line for line in last.splitlines() if line.strip().startswith(("top-target", "top-helper"))}
    assert set(rows) == set(nodes), last
    header = next(line for line in last.splitlines() if "NODE" in line)
    assert header.split() == ["NODE", "ONLINE", "BATCHES/S", "SERVED", "ERROR", "HELPERS", "LAST", "DRIFT"]
    drift = collector.events_of("top-target", "drift")
    assert drift, [e.kind for e in collector.events_of("top-target")]
    for node in nodes:
        cells = rows[node].split()
        # Seen while top ran: batches 6-11; the served error is the mean of their last ten.
        served = [collector.predictions[node][t].error for t in range(6, 12)]
        assert cells[1] == "yes"
        assert float(cells[2]) > 0
        assert cells[3] == f"{sum(served) / len(served):.3f}"
        assert cells[4] == str(len(collector.predictions[node][11].helpers))
    assert f"batch {drift[-1].detail['batch']} (" in rows["top-target"] and rows["top-helper"].split()[-1] == "-"


# --- the view ``top`` draws, without a broker ------------------------------------------------------


def _inbound(topic: str, message=None, payload: bytes = b"") -> Inbound:
    return Inbound(topic=topic, message=message, payload=payload, properties=None, received_at=0.0)


@pytest.mark.parametrize("online", [True, False])
def test_fleet_view_rows_from_status_meta_predictions_and_events(online):
    import numpy as np

    from broker.fleet_view import ERROR_BATCHES, FleetView
    from broker.wire import ArrayPayload, Event, NodeMeta, Prediction

    view = FleetView(rate_window=10.0)
    status = topics.STATUS_ONLINE if online else topics.STATUS_OFFLINE
    view.add(_inbound(topics.node_status("n1"), payload=status), now=view._started)
    view.add(_inbound(topics.node_meta("n1"), NodeMeta(node_id="n1", arch_id="a", lineage="b", hist=[1.0], helpers=2)), now=view._started)
    [row] = view.rows(now=view._started + 1)
    assert (row.node, row.online, row.helpers, row.served_error, row.last_drift_age_s) == ("n1", online, 2, None, None)
    y_hat = ArrayPayload.from_numpy(np.zeros(4, dtype=np.int64))
    errors = [0.5] * 5 + [0.1 * i for i in range(ERROR_BATCHES)]
    for i, error in enumerate(errors):
        view.add(_inbound(topics.node_prediction("n1"), Prediction(batch_id=i, y_hat=y_hat, helpers=["h"], error=error)), now=view._started + 20 + i)
    view.add(_inbound(topics.node_events("n1"), Event(node_id="n1", kind="drift", detail={"batch": 7, "classes": [8, 9]})), now=view._started + 30)
    [row] = view.rows(now=view._started + 34)
    assert row.batches_per_s == pytest.approx(sum(1 for i in range(len(errors)) if 34 - (20 + i) <= 10) / 10)
    assert row.served_error == pytest.approx(sum(errors[-ERROR_BATCHES:]) / ERROR_BATCHES)
    assert row.helpers == 1, "the helpers that served the last batch, not the older metadata"
    assert (row.last_drift_batch, row.last_drift_classes, row.last_drift_age_s) == (7, [8, 9], 4)
    view.add(_inbound("clue/v1/elsewhere", payload=b"x"))  # not a node topic: ignored
    assert [r.node for r in view.rows()] == ["n1"]


@pytest.mark.timeout(60)
def test_top_off_a_terminal_prints_each_frame_after_the_last(mosquitto):
    import io

    out = io.StringIO()
    code = ctl.main(["--broker", mosquitto.url, "top", "--count", "2", "--interval", "0.2"], out=out)
    assert code == ctl.EXIT_OK
    assert out.getvalue().count("NODE") == 2 and out.getvalue().count("clue-ctl top") == 2
    assert ctl.main(["--broker", mosquitto.url, "top", "--count", "0"]) == ctl.EXIT_USAGE
