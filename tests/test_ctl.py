"""``clue-ctl`` (broker/ctl.py): argument handling, and the real command against a live agent.

The integration tests start one ``clue-agent`` process on a broker of this module's own (a fleet
patch reaches every agent on a broker) and run ``python -m broker.ctl`` as an operator would,
checking its exit codes and output.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest

from broker import ctl, topics
from broker.client import Inbound
from broker.launcher import PrivateMosquitto
from broker.wire import NodeMeta
from edge_sim.processes import spawn_agent
from support import mosquitto_available, requires_openssl, session_left
from support.fleet import wait_status_online

NODE = "ctl-node"


def _args(*argv: str) -> argparse.Namespace:
    return ctl.build_parser().parse_args(list(argv))


# --- arguments -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("z=0.3", ("z", 0.3)),
        ("drift.window=5", ("drift.window", 5)),
        ('operator={"type":"mean"}', ("operator", {"type": "mean"})),
        ("kt_mode=relay", ("kt_mode", "relay")),
        ("value_delta=true", ("value_delta", True)),
        ("drift.threshold=null", ("drift.threshold", None)),
        ("name=a=b", ("name", "a=b")),
    ],
)
def test_assignments_are_json_where_they_parse(text, expected):
    assert ctl.parse_assignment(text) == expected


@pytest.mark.parametrize("text", ["z", "=0.3", " =1"])
def test_an_assignment_needs_a_key_and_an_equals_sign(text):
    with pytest.raises(ctl.UsageError):
        ctl.parse_assignment(text)


def test_connection_options_before_or_after_the_command():
    before = ctl.client_settings(_args("-h", "broker.lan", "-p", "1884", "status"))
    after = ctl.client_settings(_args("status", "-h", "broker.lan", "-p", "1884"))
    for settings in (before, after):
        assert (settings["host"], settings["port"], settings["tls"]) == ("broker.lan", 1884, False)
    assert ctl.client_settings(_args("status"))["port"] == 1883


def test_tls_options_turn_tls_on_and_default_to_8883(tmp_path):
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    settings = ctl.client_settings(_args("--cafile", str(ca), "status"))
    assert settings["tls"] and settings["port"] == 8883 and settings["tls_ca"] == str(ca)
    url = ctl.client_settings(_args("--broker", "mqtts://b.lan:9883", "-h", "other", "status"))
    assert (url["host"], url["port"], url["tls"]) == ("other", 9883, True)


def test_client_id_is_not_a_node_id():
    # A node-id-shaped client id would make the client subscribe to that node's reply topic.
    assert not topics.is_valid_node_id(ctl.client_settings(_args("status"))["client_id"])


def test_a_password_on_the_command_line_is_refused(capsys):
    assert ctl.main(["-u", "operator", "-P", "secret", "status"]) == ctl.EXIT_USAGE
    assert "--pw-file" in capsys.readouterr().err


def test_pw_file_needs_a_username_and_a_readable_file(tmp_path, capsys):
    assert ctl.main(["--pw-file", str(tmp_path / "missing"), "-u", "op", "status"]) == ctl.EXIT_USAGE
    assert "not a readable file" in capsys.readouterr().err
    pw = tmp_path / "pw"
    pw.write_text("secret\n")
    assert ctl.main(["--pw-file", str(pw), "status"]) == ctl.EXIT_USAGE
    assert "-u" in capsys.readouterr().err


def test_set_needs_a_target_and_valid_keys(capsys):
    with pytest.raises(SystemExit) as exc:
        ctl.main(["set", "z=0.3"])
    assert exc.value.code == ctl.EXIT_USAGE
    assert ctl.main(["set", "bad key=1", "--node", "n1"]) == ctl.EXIT_USAGE
    assert ctl.main(["set", "z=1", "--node", "bad/id"]) == ctl.EXIT_USAGE


def test_status_table_from_retained_messages():
    meta = NodeMeta(node_id="n1", arch_id="a1", lineage="l1", hist=[1.0], rolling_error=0.25, batches=7, helpers=1, ts=100.0)
    items = [
        Inbound(topics.node_status("n1"), None, b"online", None, 0.0, True),
        Inbound(topics.node_meta("n1"), meta, b"", None, 0.0, True),
        Inbound(topics.node_status("n0"), None, b"offline", None, 0.0, True),
    ]
    rows = ctl.fleet_rows(items, now=130.0)
    assert [(r.node, r.status) for r in rows] == [("n0", "offline"), ("n1", "online")]
    table = ctl.format_table(rows).splitlines()
    assert table[0].split() == ["NODE", "STATUS", "ARCH", "LINEAGE", "ERROR", "HELPERS", "BATCHES", "META", "AGE"]
    assert table[2].split() == ["n1", "online", "a1", "l1", "0.250", "1", "7", "30", "s"]


def test_an_unreachable_broker_exits_4(capsys):
    from broker.launcher import free_port

    code = ctl.main(["-h", "127.0.0.1", "-p", str(free_port()), "--connect-timeout", "0.5", "status"])
    assert code == ctl.EXIT_UNREACHABLE
    assert "no connection" in capsys.readouterr().err


# --- against a live agent ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[PrivateMosquitto]:
    """A broker of this module's own with one agent, ``NODE``, online on it."""
    if not mosquitto_available():
        pytest.skip("mosquitto not installed (Debian package 'mosquitto')")
    root = tmp_path_factory.mktemp("ctl")
    with PrivateMosquitto() as broker:
        child = spawn_agent(NODE, broker.url, root / "state", root / "logs", settings={"daemon": {"meta_interval": 0.0}})
        try:
            wait_status_online(broker, NODE, child)
            yield broker
        finally:
            child.terminate(20)


def _ctl(broker: PrivateMosquitto, *argv: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """``clue-ctl -h HOST -p PORT ARGV…`` as a process."""
    return subprocess.run(
        [sys.executable, "-m", "broker.ctl", "-h", broker.host, "-p", str(broker.port), *argv],
        capture_output=True, text=True, timeout=timeout,
    )


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_set_returns_the_ack_and_a_refusal_exits_1(live):
    done = _ctl(live, "set", "z=0.3", "drift.window=5", 'operator={"type": "mean"}', "--node", NODE)
    assert done.returncode == ctl.EXIT_OK, done.stdout + done.stderr
    assert done.stdout.strip() == f'{NODE}: applied z=0.3 drift.window=5 operator={{"type": "mean"}}'
    refused = _ctl(live, "set", "z=7", "--node", NODE)
    assert refused.returncode == ctl.EXIT_REFUSED, refused.stdout + refused.stderr
    assert refused.stdout.startswith(f"{NODE}: refused: invalid config patch: z:")
    # The refusal changed nothing: the next patch shows the earlier z.
    again = _ctl(live, "set", "pool_max=3", "--node", NODE)
    assert again.returncode == ctl.EXIT_OK and "pool_max=3" in again.stdout
    out = io.StringIO()
    assert ctl.main(["-h", live.host, "-p", str(live.port), "set", "z=0.3", "--node", NODE], out=out) == ctl.EXIT_OK


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_fleet_patch_waits_for_every_online_node(live):
    done = _ctl(live, "set", "kt_mode=relay", "--fleet")
    assert done.returncode == ctl.EXIT_OK, done.stdout + done.stderr
    assert done.stdout.strip() == f'{NODE}: applied kt_mode="relay"'
    back = _ctl(live, "set", "kt_mode=direct", "--fleet")
    assert back.returncode == ctl.EXIT_OK, back.stdout + back.stderr


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_node_that_does_not_answer_exits_3(live):
    done = _ctl(live, "set", "z=0.3", "--node", "ghost", "--timeout", "1")
    assert done.returncode == ctl.EXIT_TIMEOUT
    assert done.stdout.strip() == "ghost: no answer within 1 s"


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_status_lists_the_node(live):
    done = _ctl(live, "status")
    assert done.returncode == ctl.EXIT_OK, done.stderr
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines()[1:]}
    assert rows[NODE][1] == "online"
    assert len(rows[NODE][2]) == 16, "the arch id from the retained meta"


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_watch_prints_events_until_count(live):
    watch = subprocess.Popen(
        [sys.executable, "-m", "broker.ctl", "-h", live.host, "-p", str(live.port), "watch", "--node", NODE,
         "--kind", "config_applied", "--kind", "config_refused", "--count", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert "watching" in watch.stderr.readline()  # subscribed: events from now on reach it
        assert _ctl(live, "set", "z=0.25", "--node", NODE).returncode == ctl.EXIT_OK
        assert _ctl(live, "set", "z=2", "--node", NODE).returncode == ctl.EXIT_REFUSED
        out, _ = watch.communicate(timeout=20)
    finally:
        watch.kill()
    lines = out.splitlines()
    assert watch.returncode == 0 and len(lines) == 2
    assert lines[0].split()[1:] == [NODE, "config_applied", 'keys=["z"]']
    assert lines[1].split()[1:3] == [NODE, "config_refused"]


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_ctl_leaves_no_session_behind(live):
    """A one-shot tool's session would queue the fleet's events for a client that is gone."""
    client_id = f"ctl-session-{os.getpid()}"
    done = _ctl(live, "-i", client_id, "status")
    assert done.returncode == ctl.EXIT_OK, done.stderr
    time.sleep(3)  # the session outlives us by its 1 s expiry; Mosquitto checks expiries each second
    assert not session_left(live, client_id)


# --- a broker whose ACL refuses subscriptions ----------------------------------------------------

DYNSEC = next(iter(glob.glob("/usr/lib/*/mosquitto_dynamic_security.so") + glob.glob("/usr/lib/mosquitto_dynamic_security.so")), None)


@pytest.fixture
def refusing(tmp_path) -> Iterator[PrivateMosquitto]:
    """A broker whose ACL refuses every subscription in the SUBACK (0x87), as Mosquitto's dynamic
    security plugin, EMQX or HiveMQ do; Mosquitto 2.0's ACL file never refuses one."""
    if not mosquitto_available() or DYNSEC is None:
        pytest.skip("needs mosquitto with its dynamic security plugin (Debian package 'mosquitto')")
    broker = PrivateMosquitto(extra_conf=[f"plugin {DYNSEC}", "plugin_opt_config_file {workdir}/dynsec.json"])
    access = {"publishClientSend": True, "publishClientReceive": True, "subscribe": False, "unsubscribe": True}
    config = broker.workdir / "dynsec.json"
    config.write_text(json.dumps({"defaultACLAccess": access, "clients": [], "groups": [], "roles": []}))
    config.chmod(0o644)  # read by mosquitto as its own user
    with broker:
        yield broker


@pytest.mark.integration
@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", [["status"], ["set", "z=0.3", "--node", NODE], ["set", "z=0.3", "--fleet"], ["watch", "--count", "1"]])
def test_a_refused_subscription_exits_4_and_says_so(refusing, command):
    done = _ctl(refusing, *command)
    assert done.returncode == ctl.EXIT_UNREACHABLE, done.stdout + done.stderr
    assert "refused our subscription" in done.stderr and "Not authorized" in done.stderr, done.stderr
    assert "no node" not in done.stdout + done.stderr


# --- over TLS, through the fleet ACL -------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.timeout(90)
@requires_openssl
def test_operator_over_tls_and_the_relay_acl(tmp_path):
    """The operator identity of the shipped ACL may patch a node; a node's identity sees no fleet
    and says why; no certificate, no connection.

    The agent reads its key as systemd hands it over: a credential name looked up in
    ``$CREDENTIALS_DIRECTORY``.
    """
    if not mosquitto_available():
        pytest.skip("mosquitto not installed (Debian package 'mosquitto')")
    from broker import certs as certs_mod
    from broker.mosquitto import private

    node = "tls-node"
    directory = tempfile.mkdtemp(prefix="clue-ctl-certs-")  # 0755: mosquitto reads the server key
    try:
        certs = certs_mod.generate(directory, nodes=[node], roles=["operator"])
        creds = tmp_path / "credentials"
        creds.mkdir()
        shutil.copy(certs.key(node), creds / "clue-agent.key")
        with private("secure.conf", certs=certs, topology="relay") as broker:
            child = spawn_agent(
                node, broker.url, tmp_path / "state", tmp_path / "logs",
                settings={"tls_ca": str(certs.ca), "tls_cert": str(certs.cert(node)), "tls_key": "clue-agent.key"},
                env={"CREDENTIALS_DIRECTORY": str(creds)},
            )
            try:
                wait_status_online(broker, node, child, **certs.client_kwargs("operator"))
                tls = ["--broker", broker.url, "--cafile", str(certs.ca), "--cert", str(certs.cert("operator")), "--key", str(certs.key("operator"))]
                done = subprocess.run([sys.executable, "-m", "broker.ctl", *tls, "set", "z=0.4", "--node", node], capture_output=True, text=True, timeout=30)
                assert done.returncode == ctl.EXIT_OK, done.stdout + done.stderr
                assert done.stdout.strip() == f"{node}: applied z=0.4"
                status = subprocess.run([sys.executable, "-m", "broker.ctl", *tls, "status"], capture_output=True, text=True, timeout=30)
                assert status.returncode == ctl.EXIT_OK, status.stderr
                assert [line.split()[:2] for line in status.stdout.splitlines()[1:]] == [[node, "online"]]
                # A node's certificate may not read the fleet: Mosquitto grants the subscription
                # and delivers nothing, which must not pass for an empty broker.
                own = ["--broker", broker.url, "--cafile", str(certs.ca), "--cert", str(certs.cert(node)), "--key", str(certs.key(node))]
                blind = subprocess.run([sys.executable, "-m", "broker.ctl", *own, "status"], capture_output=True, text=True, timeout=30)
                assert blind.returncode == ctl.EXIT_TIMEOUT, blind.stdout + blind.stderr
                assert "may not read them" in blind.stderr and "operator" in blind.stderr, blind.stderr
                bare = subprocess.run(
                    [sys.executable, "-m", "broker.ctl", "--broker", broker.url, "--cafile", str(certs.ca), "--connect-timeout", "2", "status"],
                    capture_output=True, text=True, timeout=30,
                )
                assert bare.returncode == ctl.EXIT_UNREACHABLE, bare.stdout + bare.stderr
            finally:
                child.terminate(20)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
