"""Deployment (deploy/, docs/operations.md): what an operator installs works as documented.

- The systemd units verify clean with ``systemd-analyze verify`` (any output fails), keep their
  ``systemd-analyze security --offline=true`` exposure within a budget (the scores are printed and
  recorded as test properties), and carry the settings the daemons rely on.
- The compose fleet validates with ``docker-compose config`` and matches its scenario.
- ``clue-agent`` run as systemd runs it — a notify socket, ``WATCHDOG_USEC``, SIGHUP, SIGTERM —
  says READY=1, pings the watchdog, reloads, and leaves a checkpoint; a bad config exits 78.
- The guide lists every knob with its default, and its ``mosquitto_pub`` and ``clue-ctl`` lines,
  run as written against a live agent, are acknowledged.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import types
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from broker import topics
from broker.client import ErrorEvent, Inbound, MqttClient
from broker.launcher import PrivateMosquitto
from broker.wire import ConfigAck, Event
from edge_sim.processes import Child, spawn, spawn_agent
from support import requires_mosquitto

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "deploy" / "systemd"
COMPOSE = ROOT / "deploy" / "compose"
GUIDE = ROOT / "docs" / "operations.md"
#: Where the units expect the package (a venv made by pip install; see docs/operations.md).
VENV_BIN = "/opt/clue-edge/.venv/bin"
#: Unit file → the unit name that verify loads (a template needs an instance).
UNIT_NAMES = {
    "clue-agent.service": "clue-agent.service",
    "clue-agent@.service": "clue-agent@edge-1.service",
    "clue-mds.service": "clue-mds.service",
    "clue-relay.service": "clue-relay.service",
}
#: Highest `systemd-analyze security` exposure allowed (0 safest, 10 unsafe; "OK" below 2.5). The
#: agent may not use MemoryDenyWriteExecute=, PrivateDevices= or PrivateUsers= (torch, GPUs).
EXPOSURE_BUDGET = {"clue-agent.service": 2.0, "clue-agent@.service": 2.0, "clue-mds.service": 1.5, "clue-relay.service": 1.5}
#: Console scripts the units, the compose file and the guide run.
CONSOLE_SCRIPTS = ("clue-agent", "clue-mds", "clue-relay", "clue-ctl", "clue-sim")
COMPOSE_AGENTS = [f"node-{i}" for i in range(5)]


def _require(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} not found: install the Debian package '{package}' (scripts/setup.sh does)")
    return path


def unit_settings(path: Path) -> dict[str, list[str]]:
    """``Key -> [values]`` over every section of a unit file (keys may repeat)."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


# --- systemd units -------------------------------------------------------------------------------


def _exec_binaries(path: Path) -> set[str]:
    """The programs a unit file runs: the first word of each Exec*= line (prefixes such as - stripped)."""
    found = set()
    for key, values in unit_settings(path).items():
        if key.startswith("Exec"):
            found |= {v.split()[0].lstrip("-@:+!") for v in values if v}
    return found


@pytest.fixture(scope="module")
def sd_root(tmp_path_factory) -> Path:
    """A root for ``systemd-analyze verify --root``: the host's system units, ours in /etc, and what
    an install provides: the console scripts in the venv, and the host's own programs."""
    root = tmp_path_factory.mktemp("sdroot")
    system = next((p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir()), None)
    if system is None:
        pytest.fail("no /usr/lib/systemd/system: install the Debian package 'systemd'")
    # A copy, not a symlink: verify resolves links inside the root, so a link out of it loops.
    shutil.copytree(system, root / "usr/lib/systemd/system", symlinks=True)
    etc = root / "etc/systemd/system"
    shutil.copytree(UNITS, etc, ignore=shutil.ignore_patterns("*.toml", "*.env"))
    programs = {f"{VENV_BIN}/{name}" for name in CONSOLE_SCRIPTS}
    for unit in [*etc.rglob("*.service"), *etc.rglob("*.conf"), system / "mosquitto.service"]:
        if unit.is_file():
            programs |= {p for p in _exec_binaries(unit) if os.access(p, os.X_OK)}
    for program in programs:
        stub = root / program.lstrip("/")
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\n")
        stub.chmod(0o755)
    return root


def _verify(root: Path, unit: str) -> subprocess.CompletedProcess:
    analyze = _require("systemd-analyze", "systemd")
    return subprocess.run([analyze, "verify", f"--root={root}", unit], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("unit", sorted(UNIT_NAMES))
def test_unit_verifies_without_a_warning(unit, sd_root):
    done = _verify(sd_root, UNIT_NAMES[unit])
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), done.stdout + done.stderr


def test_mosquitto_drop_in_verifies_without_a_warning(sd_root):
    if not (sd_root / "usr/lib/systemd/system/mosquitto.service").is_file():
        pytest.fail("no mosquitto.service: install the Debian package 'mosquitto'")
    done = _verify(sd_root, "mosquitto.service")
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), done.stdout + done.stderr
    assert _exec_binaries(UNITS / "mosquitto.service.d" / "clue.conf") == {"/usr/sbin/mosquitto"}


def test_verify_catches_a_binary_that_is_not_installed(sd_root):
    """The check is strict: an ExecStart= outside the installed layout fails it."""
    broken = (UNITS / "clue-agent.service").read_text().replace("/bin/clue-agent ", "/bin/clue-agnet ")
    (sd_root / "etc/systemd/system/broken-agent.service").write_text(broken)
    done = _verify(sd_root, "broken-agent.service")
    assert done.returncode != 0 and "clue-agnet" in done.stderr


@pytest.mark.parametrize("unit", sorted(UNIT_NAMES))
def test_unit_security_exposure_within_budget(unit, record_property):
    analyze = _require("systemd-analyze", "systemd")
    done = subprocess.run([analyze, "security", "--offline=true", str(UNITS / unit)], capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", done.stdout + done.stderr)
    assert found, done.stdout + done.stderr
    score = float(found.group(1))
    record_property(f"exposure:{unit}", score)
    print(f"systemd-analyze security --offline=true {unit}: {score}")
    assert score <= EXPOSURE_BUDGET[unit], "\n".join(line for line in done.stdout.splitlines() if "✗" in line)
    row = next(line for line in GUIDE.read_text().splitlines() if line.startswith("| `") and f"`{unit}`" in line)
    assert f"| {score} |" in row, f"docs/operations.md records another score for {unit}: {row[:80]}"


@pytest.mark.parametrize("unit", sorted(UNIT_NAMES))
def test_unit_has_the_issue_hardening(unit):
    s = unit_settings(UNITS / unit)
    expected = {
        "Restart": ["on-failure"], "DynamicUser": ["yes"], "ProtectSystem": ["strict"], "ProtectHome": ["yes"],
        "PrivateTmp": ["yes"], "NoNewPrivileges": ["yes"], "UMask": ["0077"],
    }
    for key, value in expected.items():
        assert s.get(key) == value, f"{unit}: {key}={s.get(key)}"
    assert "@system-service" in s["SystemCallFilter"]
    assert s["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    assert s["ConfigurationDirectory"] and s["LoadCredential"]
    assert s["ExecStart"][0].startswith(f"{VENV_BIN}/")


@pytest.mark.parametrize("unit", ["clue-agent.service", "clue-agent@.service"])
def test_agent_units_fit_the_daemon(unit):
    """Notify with a watchdog, reload by SIGHUP, state dir, no sandboxing that breaks torch or GPUs."""
    from service.exit_codes import EXIT_CONFIG

    s = unit_settings(UNITS / unit)
    assert s["Type"] == ["notify"] and s["WatchdogSec"] and s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["RestartPreventExitStatus"] == [str(EXIT_CONFIG)] == ["78"]
    assert s["StateDirectory"] and "--state-dir %S/" in s["ExecStart"][0]
    for forbidden in ("MemoryDenyWriteExecute", "PrivateDevices", "PrivateUsers", "DevicePolicy"):
        assert forbidden not in s, f"{unit}: {forbidden}= breaks torch or hides GPUs"
    text = (UNITS / unit).read_text()
    assert "MemoryDenyWriteExecute" in text and "PrivateDevices" in text, "the comment saying why they are left out"


def test_service_units_fit_their_daemons():
    """Exit codes as the daemons share them; notify and watchdog; no SIGHUP where the daemon has none."""
    from service.exit_codes import EXIT_CONFIG

    mds = unit_settings(UNITS / "clue-mds.service")
    assert mds["RestartPreventExitStatus"] == [str(EXIT_CONFIG)]
    rel = unit_settings(UNITS / "clue-relay.service")
    assert rel["RestartPreventExitStatus"] == [str(EXIT_CONFIG)]
    for s in (mds, rel):  # test_service_says_ready_and_pings_the_watchdog
        assert s["Type"] == ["notify"] and s["WatchdogSec"] and "ExecReload" not in s


@pytest.mark.parametrize("script", CONSOLE_SCRIPTS)
def test_console_script_the_deployment_runs_is_declared(script):
    """The units run /opt/clue-edge/.venv/bin/<script>: pip creates it only if pyproject declares it."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("scripts", {})
    assert script in declared, f"pyproject.toml [project.scripts] lacks {script}" + (' = "broker.ctl:main"' if script == "clue-ctl" else "")
    module, _, function = declared[script].partition(":")
    assert callable(getattr(importlib.import_module(module), function)), declared[script]


def test_example_agent_config_is_valid(tmp_path, monkeypatch):
    """Valid on a box that holds the files it names (every one is checked at start: a typo exits 78)."""
    from agent.settings import load_settings

    etc = tmp_path / "etc"
    etc.mkdir()
    text = (UNITS / "agent.toml").read_text().replace("/etc/clue-agent/", f"{etc}/")
    for name in ("ca.crt", "edge-1.crt", "base.npz", "clue-agent.key"):
        (etc / name).write_bytes(b"x")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(etc))
    (tmp_path / "agent.toml").write_text(text)
    settings = load_settings(tmp_path / "agent.toml")
    assert settings.tls_key == "clue-agent.key", "a credential name, found in $CREDENTIALS_DIRECTORY"
    assert settings.daemon.kt_mode == "relay", "secure.conf's relay ACL lets no node write another's kt topic"


@pytest.mark.parametrize("env_file", ["mds.env", "relay.env"])
def test_example_mds_and_relay_settings_name_real_settings(env_file):
    from broker.relay import RelaySettings
    from mds.cli import MdsSettings

    settings = {"mds.env": MdsSettings, "relay.env": RelaySettings}[env_file]
    env = dict(line.split("=", 1) for line in (UNITS / env_file).read_text().splitlines() if line and not line.startswith("#"))
    prefix = settings.model_config["env_prefix"]
    names = {f"{prefix}{name.upper()}" for name in settings.model_fields}
    assert set(env) <= names, set(env) - names


# --- docker compose ------------------------------------------------------------------------------


def _compose(*args: str, file: Path = COMPOSE / "docker-compose.yml") -> subprocess.CompletedProcess:
    binary = _require("docker-compose", "docker-compose")
    return subprocess.run([binary, "-f", str(file), *args], capture_output=True, text=True, timeout=60, cwd=file.parent)


def test_compose_file_validates():
    done = _compose("config", "-q")
    assert done.returncode == 0, done.stderr
    services = _compose("config", "--services").stdout.split()
    assert sorted(services) == sorted(["mosquitto", "base", "mds", "relay", "feeder", "prometheus", "grafana", *COMPOSE_AGENTS])


def test_compose_validation_rejects_a_broken_file(tmp_path):
    """The check above means something: docker-compose refuses an invalid condition."""
    broken = (COMPOSE / "docker-compose.yml").read_text().replace("condition: service_healthy", "condition: whenever", 1)
    (tmp_path / "docker-compose.yml").write_text(broken)
    assert _compose("config", "-q", file=tmp_path / "docker-compose.yml").returncode != 0


def test_compose_fleet_is_the_default_scenario():
    """As many agents as the scenario has nodes, running its `clue` mode (the agent as shipped) from agent.toml."""
    from agent.config import LearnerConfig
    from agent.settings import load_settings
    from edge_sim.datasets.sources import BUILT_IN_CLASSES
    from edge_sim.modes import MODES
    from edge_sim.scenario import load_scenario

    text = (COMPOSE / "docker-compose.yml").read_text()
    scenario = load_scenario(re.search(r'"--scenario", "([^"]+)"', text).group(1))
    assert scenario.nodes == len(COMPOSE_AGENTS)
    assert f'"--nodes", "{",".join(COMPOSE_AGENTS)}"' in text
    for node in COMPOSE_AGENTS:
        assert f'"--node-id", "{node}"' in text
    settings = load_settings(COMPOSE / "clue" / "agent.toml", node_id="node-0")
    assert settings.learner == LearnerConfig.model_validate({**scenario.learner, **MODES["clue"]})
    assert (settings.model, settings.num_classes) == (scenario.model, BUILT_IN_CLASSES[scenario.dataset])
    assert settings.broker == "mqtt://mosquitto:1883" and str(settings.state_dir) == "/var/lib/clue-agent"


def _conf_options(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            out.setdefault(key, []).append(value)
    return out


@pytest.mark.integration
@pytest.mark.timeout(30)
@requires_mosquitto
def test_compose_broker_config_runs_with_dev_conf_limits(make_client):
    """The compose broker keeps dev.conf's choices, and Mosquitto accepts the file."""
    text = (COMPOSE / "mosquitto.conf").read_text()
    ours, dev = _conf_options(text), _conf_options((ROOT / "broker/mosquitto/dev.conf").read_text())
    differ = {k for k in set(ours) | set(dev) if ours.get(k) != dev.get(k)}
    assert differ == {"listener", "persistence_location", "log_dest", "user"}, differ
    local = text.replace("listener 1883\n", "listener {port} 127.0.0.1\n").replace("/mosquitto/data/", "{data_dir}/")
    with PrivateMosquitto(config_text=local) as broker:
        client = make_client(broker, client_id=f"compose-conf-{os.getpid()}")
        assert client.wait_connected(10)


# --- the agent as systemd runs it ----------------------------------------------------------------


@pytest.fixture
def notify_socket() -> Iterator[tuple[str, socket.socket]]:
    """What systemd binds for a Type=notify service: an AF_UNIX datagram socket (short path)."""
    directory = tempfile.mkdtemp(prefix="sdn", dir="/tmp")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    yield path, sock
    sock.close()
    shutil.rmtree(directory)


def _expect(sock: socket.socket, wanted: str, timeout: float, child: Child, seen: list[str]) -> None:
    """Read datagrams into ``seen`` until one holds the line ``wanted``."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(min(left, 0.5))
        try:
            message = sock.recv(4096).decode()
        except TimeoutError:
            assert child.alive() or wanted == "STOPPING=1", child.log_text()[-3000:]
            continue
        seen.append(message)
        if wanted in message.splitlines():
            return
    raise AssertionError(f"no {wanted} in {timeout} s; got {seen}\n{child.log_text()[-3000:]}")


def _agent_toml(path: Path, node: str, broker: PrivateMosquitto, state: Path, z: float) -> Path:
    path.write_text(f'node_id = "{node}"\nbroker = "{broker.url}"\nstate_dir = "{state}"\n\n[learner]\nz = {z}\n')
    return path


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_agent_under_systemd_notify_watchdog_reload_and_stop(fresh_mosquitto, make_client, notify_socket, tmp_path):
    path, sock = notify_socket
    node = "sd-node"
    config = _agent_toml(tmp_path / "agent.toml", node, fresh_mosquitto, tmp_path / "state", 0.5)
    events = make_client(fresh_mosquitto, client_id=f"sd-observer-{os.getpid()}")
    events.subscribe(topics.node_events(node), 1)
    assert events.wait_subscribed(10)
    # WatchdogSec=2: pings every second.
    child = spawn("agent", [sys.executable, "-m", "agent", "--config", str(config)], tmp_path / "logs",
                  env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
    seen: list[str] = []
    try:
        _expect(sock, "READY=1", 60, child, seen)
        _expect(sock, "WATCHDOG=1", 5, child, seen)
        # systemctl reload: ExecReload=/bin/kill -HUP $MAINPID after the file changed.
        _agent_toml(config, node, fresh_mosquitto, tmp_path / "state", 0.3)
        child.process.send_signal(signal.SIGHUP)
        _expect(sock, "RELOADING=1", 10, child, seen)
        _expect(sock, "READY=1", 10, child, seen)
        applied = _next_event(events, "config_applied", 10)
        assert applied.detail.get("source") == "reload"
        # systemctl stop: SIGTERM, then the exit status decides whether Restart= applies.
        child.process.send_signal(signal.SIGTERM)
        _expect(sock, "STOPPING=1", 30, child, seen)
        assert child.process.wait(30) == 0, child.log_text()[-3000:]
    finally:
        child.terminate(10)
    assert (tmp_path / "state" / f"{node}.ckpt.npz").is_file(), "SIGTERM leaves a checkpoint"
    assert any(m.startswith("STATUS=") for m in seen), "systemctl status shows what the agent does"


def _next_event(client: MqttClient, kind: str, timeout: float) -> Event:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        item = client.get(timeout=left)
        if isinstance(item, Inbound) and isinstance(item.message, Event) and item.message.kind == kind:
            return item.message
    raise AssertionError(f"no {kind} event in {timeout} s")


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_bad_config_exits_78_so_systemd_does_not_restart(tmp_path):
    invalid = tmp_path / "invalid.toml"
    invalid.write_text('node_id = "n1"\n[learner]\nz = 7\n')
    cases = {"invalid value": invalid, "missing file": tmp_path / "missing.toml"}
    # Both at once: each pays for importing torch.
    runs = {
        case: subprocess.Popen([sys.executable, "-m", "agent", "--config", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for case, path in cases.items()
    }
    for case, run in runs.items():
        _, err = run.communicate(timeout=50)
        assert run.returncode == 78, (case, err)
        assert err.startswith("clue-agent: "), (case, err)


@pytest.mark.integration
@pytest.mark.timeout(90)
@pytest.mark.parametrize("service", ["mds", "relay"])
def test_service_says_ready_and_pings_the_watchdog(fresh_mosquitto, notify_socket, tmp_path, service):
    path, sock = notify_socket
    argv = {
        "mds": [sys.executable, "-m", "mds", "--broker", fresh_mosquitto.url, "--db", str(tmp_path / "mds.db"), "--client-id", "mds-sd"],
        "relay": [sys.executable, "-m", "broker.relay", "--broker", fresh_mosquitto.url],
    }[service]
    child = spawn(service, argv, tmp_path / "logs", env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
    seen: list[str] = []
    try:
        _expect(sock, "READY=1", 30, child, seen)
        _expect(sock, "WATCHDOG=1", 10, child, seen)
        child.process.send_signal(signal.SIGTERM)
        assert child.process.wait(30) == 0, child.log_text()[-3000:]
    finally:
        child.terminate(10)


# --- the operations guide ------------------------------------------------------------------------


def _default_text(value: object) -> str:
    """A default as the guide writes it: JSON, a nested plugin config by its type."""
    if isinstance(value, BaseModel):
        # A strategy known by name is written as the bare name (agent.kt.strategy).
        dumped = value.model_dump(mode="json")
        return json.dumps(dumped if isinstance(dumped, str) else {"type": value.type})
    if isinstance(value, Path):
        value = str(value)
    return json.dumps(value)


def _models(annotation: object) -> list[type[BaseModel]]:
    """The pydantic models a field holds: one, or the members of a discriminated union."""
    candidates = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)
    return [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]


def _documented_fields() -> list[tuple[str, str]]:
    """``(key, default)`` of every agent setting and knob, nested plugin fields as ``drift.window``."""
    from agent.config import LearnerConfig
    from agent.settings import AgentSettings, DaemonKnobs

    rows: list[tuple[str, str]] = []
    for model in (AgentSettings, DaemonKnobs, LearnerConfig):
        for name, field in model.model_fields.items():
            if name in ("daemon", "learner"):
                continue
            rows.append((name, _field_default(field)))
            for variant in _models(field.annotation):
                rows += [(f"{name}.{sub}", _field_default(f)) for sub, f in variant.model_fields.items() if sub != "type"]
    return rows


def _field_default(field: FieldInfo) -> str:
    return "required" if field.is_required() else _default_text(field.get_default(call_default_factory=True))


def test_guide_lists_every_knob_with_its_default():
    guide = GUIDE.read_text()
    missing = [f"| `{key}` | `{default}` |" for key, default in _documented_fields() if f"| `{key}` | `{default}` |" not in guide]
    assert not missing, "docs/operations.md lacks these rows:\n" + "\n".join(missing)


def test_guide_names_every_plugin_type():
    from agent.config import LearnerConfig
    from agent.kt.strategy import NamedStrategyConfig

    guide = GUIDE.read_text()
    for name, field in LearnerConfig.model_fields.items():
        for variant in _models(field.annotation):
            if issubclass(variant, NamedStrategyConfig):
                for choice in typing.get_args(variant.model_fields["type"].annotation):
                    assert f"`{choice}`" in guide or f'"{choice}"' in guide, (name, choice)
            else:
                assert f'`{{"type": "{variant.model_fields["type"].default}"}}`' in guide, (name, variant.__name__)


def _guide_lines(start: str) -> list[str]:
    """The lines of the guide's shell blocks that start with ``start``."""
    blocks = re.findall(r"```sh\n(.*?)```", GUIDE.read_text(), re.S)
    return [line for block in blocks for line in block.splitlines() if line.startswith(start)]


def _nested(values: dict) -> dict:
    out: dict = {}
    for key, value in values.items():
        head, _, rest = key.partition(".")
        if rest:
            out.setdefault(head, {})[rest] = value
        else:
            out[key] = value
    return out


def _contains(applied: object, wanted: object) -> bool:
    if isinstance(wanted, dict):
        return isinstance(applied, dict) and all(_contains(applied.get(k), v) for k, v in wanted.items())
    return applied == wanted


def _is_patch(line: str) -> bool:
    return line.startswith("mosquitto_pub ") and "/config " in line and " -m " in line


def _payload(line: str) -> dict:
    words = shlex.split(line)
    return json.loads(words[words.index("-m") + 1])


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_guide_commands_for_common_changes_work(fresh_mosquitto, make_client, tmp_path):
    """The guide's lines run as written, in its order (bash, with its $MQTT and $NODE), against a
    live agent named as in the guide: each ``mosquitto_pub`` patch is acknowledged with what it
    set, each ``clue-ctl set`` exits 0, and ``clue-ctl status`` lists the node."""
    _require("mosquitto_pub", "mosquitto-clients")
    lines = [line for line in _guide_lines("") if _is_patch(line) or line.startswith(("clue-ctl set ", "clue-ctl status"))]
    patches = [line for line in lines if _is_patch(line)]
    assert {shlex.split(p)[shlex.split(p).index("-t") + 1] for p in patches} >= {"clue/v1/node/$NODE/config", "clue/v1/fleet/config"}
    for wanted in ({"z": 0.3}, {"drift.window": 5}, {"operator": {"type": "mean"}}, {"kt_mode": "relay"}):
        assert wanted in [_payload(p) for p in patches], wanted
    assert len(lines) - len(patches) >= 5, lines
    node = "edge-1"
    acks = make_client(fresh_mosquitto, client_id=f"guide-observer-{os.getpid()}")
    acks.subscribe(topics.node_config_ack(node), 1)
    assert acks.wait_subscribed(10)
    child = spawn_agent(node, fresh_mosquitto.url, tmp_path / "state", tmp_path / "logs")
    env = {**os.environ, "MQTT": f"-h {fresh_mosquitto.host} -p {fresh_mosquitto.port}", "NODE": node, "PY": sys.executable}
    # clue-ctl as installed: the console script runs broker.ctl.
    define = 'clue-ctl() { "$PY" -m broker.ctl $MQTT "$@"; }; '
    try:
        _wait_started(fresh_mosquitto, make_client, node, child)
        for line in lines:
            done = subprocess.run(["bash", "-c", define + line], env=env, capture_output=True, text=True, timeout=30)
            assert done.returncode == 0, f"{line}\n{done.stdout}{done.stderr}"
            if not _is_patch(line):
                assert node in done.stdout, f"{line}\n{done.stdout}"
            if not line.startswith("clue-ctl status"):
                ack = _next_ack(acks, 15)
                assert ack.ok, f"{line}\n{ack.error}"
                if _is_patch(line):
                    assert _contains(ack.applied, _nested(_payload(line))), (line, ack.applied)
    finally:
        child.terminate(20)


def _wait_started(broker: PrivateMosquitto, make_client, node: str, child: Child) -> None:
    """Until the node says online: subscribed, so a patch from now on reaches it."""
    client = make_client(broker, client_id=f"probe-{node}-{os.getpid()}")
    client.subscribe(topics.node_status(node), 1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert child.alive(), child.log_text()[-3000:]
        item = client.get(timeout=0.2)
        if isinstance(item, Inbound) and item.payload == topics.STATUS_ONLINE:
            return
    raise AssertionError(f"{node} never came online\n{child.log_text()[-3000:]}")


def _next_ack(client: MqttClient, timeout: float) -> ConfigAck:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        item = client.get(timeout=left)
        if isinstance(item, ErrorEvent):
            raise AssertionError(f"observer error: {item.error}")
        if isinstance(item, Inbound) and isinstance(item.message, ConfigAck):
            return item.message
    raise AssertionError(f"no config ack in {timeout} s")
