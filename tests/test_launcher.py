"""`PrivateMosquitto`: generated config, start/stop/kill/restart, unix sockets, custom configs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from broker import topics
from broker.client import Inbound, MqttClient
from broker.errors import BrokerError, BrokerNotFound, BrokerStartError
from broker.launcher import Listener, PrivateMosquitto, find_mosquitto, free_port
from support import requires_mosquitto, wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(60),
    requires_mosquitto,
]


def accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def retained_payload(url: str, topic: str, client_id: str, timeout: float = 10.0) -> bytes | None:
    client = MqttClient.from_url(url, client_id=client_id, reconnect_min_delay=0.05, reconnect_max_delay=0.5)
    client.subscribe(topic, decoding="raw")
    client.start()
    try:
        item = client.get(timeout)
        return item.payload if isinstance(item, Inbound) else None
    finally:
        client.stop()


def test_generated_config_sets_every_limit_explicitly() -> None:
    broker = PrivateMosquitto()
    try:
        text = broker.render_config()
    finally:
        broker.close()
    lines = [ln.strip() for ln in text.splitlines()]
    for expected in [
        "persistence true",
        "autosave_on_changes true",
        "autosave_interval 1",
        "max_packet_size 1114112",
        "max_queued_messages 10000",
        "max_queued_bytes 67108864",
        "max_inflight_messages 20",
        "allow_anonymous true",
        "set_tcp_nodelay true",
    ]:
        assert expected in lines, expected
    assert any(ln.startswith("persistence_location ") for ln in lines)
    assert any(ln.startswith("log_dest file ") for ln in lines)
    assert sum(ln.startswith("#") for ln in lines) >= 20  # every choice says what it costs
    assert "1800 s" in text and "10 of 10" in text
    if os.geteuid() == 0:
        assert "user mosquitto" in lines or "user nobody" in lines


def test_start_stop_url_and_logs() -> None:
    with PrivateMosquitto() as broker:
        assert broker.running and broker.url == f"mqtt://127.0.0.1:{broker.port}"
        assert accepts(broker.host, broker.port)
        assert "running" in broker.log_text()
        workdir, port = broker.workdir, broker.port
        broker.stop()
        assert not broker.running and not accepts("127.0.0.1", port)
    assert not workdir.exists()


def test_kill_and_restart_keep_port_and_data() -> None:
    with PrivateMosquitto() as broker:
        port = broker.port
        topic = topics.node_meta("launcher-kill")
        subprocess.run(
            ["mosquitto_pub", "-h", broker.host, "-p", str(port), "-q", "1", "-r", "-t", topic, "-m", "survivor"],
            check=True, timeout=10,
        )
        db = broker.data_dir / "mosquitto.db"
        wait_until(lambda: db.exists() and b"survivor" in db.read_bytes(), 10, what="autosave to write the retained message")
        pid = broker.pid
        broker.kill()
        assert not broker.running and not accepts("127.0.0.1", port)
        broker.start()
        assert broker.port == port and broker.pid != pid and broker.starts == 2
        assert retained_payload(broker.url, topic, "launcher-kill-reader") == b"survivor"


def test_unix_socket_listener() -> None:
    with PrivateMosquitto(listeners=[Listener(unix_path="")]) as broker:
        assert broker.url == f"unix://{broker.unix_path}" and os.path.exists(broker.unix_path or "")
        client = MqttClient.from_url(broker.url, client_id="launcher-unix")
        client.start()
        try:
            assert client.wait_connected(10)
        finally:
            client.stop()
        broker.kill()
        broker.start()  # the stale socket file of the killed broker does not block the restart
        assert broker.running


def test_extra_conf_and_several_listeners() -> None:
    with PrivateMosquitto(
        extra_conf=["max_keepalive 30", "# a comment line"],
        listeners=[Listener(name="main"), Listener(name="second", options=("max_connections 5",))],
    ) as broker:
        a, b = broker.listener("main"), broker.listener("second")
        assert a.port != b.port and accepts(a.host, a.port) and accepts(b.host, b.port)
        text = broker.config_path.read_text()
        assert "max_keepalive 30" in text and "max_connections 5" in text
        assert text.index("max_keepalive 30") < text.index(f"listener {a.port}")
        assert broker.port == a.port


def test_bad_config_fails_with_the_log_tail() -> None:
    broker = PrivateMosquitto(extra_conf="no_such_option 1")
    try:
        with pytest.raises(BrokerStartError) as info:
            broker.start()
        assert "no_such_option" in str(info.value)
        assert not broker.running
    finally:
        broker.close()


def test_custom_config_text_with_placeholders() -> None:
    config = "\n".join(
        [
            "listener {port} {host}",
            "allow_anonymous true",
            "persistence true",
            "persistence_location {data_dir}/",
            "log_dest file {log_file}",
            "",
        ]
    )
    with PrivateMosquitto(config_text=config) as broker:
        assert accepts(broker.host, broker.port)
        rendered = broker.config_path.read_text()
        assert f"listener {broker.port} 127.0.0.1" in rendered and "{" not in rendered


def test_missing_binary_names_the_debian_package(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BrokerNotFound):
        with PrivateMosquitto(binary="/nonexistent/mosquitto"):
            pass
    monkeypatch.setattr("broker.launcher.shutil.which", lambda name: None)
    monkeypatch.setattr("broker.launcher.os.path.isfile", lambda path: False)
    with pytest.raises(BrokerNotFound, match="apt-get install mosquitto"):
        find_mosquitto()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the run directory to another user")
def test_root_run_directory_must_be_reachable(tmp_path: Path) -> None:
    # pytest's tmp_path sits under /tmp/pytest-of-root (mode 0700): mosquitto's user cannot enter it.
    broker = PrivateMosquitto(workdir=tmp_path / "run")
    with pytest.raises(BrokerError, match="cannot reach"):
        broker.start()
    assert not broker.running


def test_free_port_and_binary_lookup() -> None:
    port = free_port()
    assert 0 < port < 65536 and not accepts("127.0.0.1", port)
    assert os.access(find_mosquitto(), os.X_OK)


def test_command_line_runs_until_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker.launcher"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        url = proc.stdout.readline().strip() if proc.stdout else ""
        assert url.startswith("mqtt://127.0.0.1:")
        port = int(url.rsplit(":", 1)[1])
        assert accepts("127.0.0.1", port)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert not accepts("127.0.0.1", port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
