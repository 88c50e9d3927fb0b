"""`service.settings`: one way to configure every daemon. A TOML file (`--config`), then
`CLUE_<DAEMON>_*` variables, then flags, a later source winning; unknown keys, bad values and
missing files are refused naming the field, and a daemon refusing its settings exits 78.

The same checks run for each daemon (`DAEMONS`): in-process for the values, then as real
processes for the exit codes, with a bad value from each source and a later source mending it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
from pydantic import BaseModel, Field
from pydantic_settings import SettingsConfigDict

from broker.relay import RelaySettings
from edge_sim.aggregator import AggregatorSettings
from mds.cli import MdsSettings
from service.exit_codes import EXIT_CONFIG, EXIT_OK
from service.settings import BrokerSettings, ConfigError, DaemonSettings

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    """A daemon, one of its numeric settings, three good values of it other than the default and a
    bad one (as TOML and flag text)."""

    module: str
    settings: type[DaemonSettings]
    field: str
    good: tuple[str, str, str]
    bad: str
    #: What the daemon cannot start without, as TOML lines.
    required: str = ""
    #: A line the daemon logs once it runs.
    running: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")

    @property
    def variable(self) -> str:
        return f"{self.settings.model_config['env_prefix']}{self.field.upper()}"


DAEMONS = {
    "clue-mds": Case("mds", MdsSettings, "max_k", ("8", "9", "10"), "500", running="serving"),
    "clue-relay": Case("broker.relay", RelaySettings, "candidates", ("4", "5", "6"), "0", running="serving"),
    "clue-aggregator": Case(
        "edge_sim.aggregator",
        AggregatorSettings,
        "round_timeout",
        ("5", "6", "7"),
        "0",
        required='job = "j"\nevery = 1\nmembers = ["a", "b"]\nper_round = 2\n',
        running="aggregating job j",
    ),
}


@pytest.fixture(autouse=True)
def no_clue_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in os.environ:
        if name.startswith("CLUE_") or name == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(name)


def toml(path: Path, case: Case, value: str | None) -> Path:
    """A settings file at `path` with what `case` requires, and `value` for its field unless None."""
    path.write_text(case.required + (f"{case.field} = {value}\n" if value is not None else ""))
    return path


@pytest.mark.parametrize("name", sorted(DAEMONS))
def test_a_later_source_wins(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    case = DAEMONS[name]
    in_file, in_env, in_flag = case.good
    config = ["--config", str(toml(tmp_path / "set.toml", case, in_file))]

    def value(argv: list[str]) -> float:
        return float(getattr(case.settings.from_argv(argv), case.field))

    assert value(["--config", str(toml(tmp_path / "unset.toml", case, None))]) not in [float(v) for v in case.good]
    assert value(config) == float(in_file)
    monkeypatch.setenv(case.variable, in_env)
    assert value(config) == float(in_env)
    assert value([*config, case.flag, in_flag]) == float(in_flag)
    assert case.settings.from_argv(config).config_file == tmp_path / "set.toml", "for a reload to read again"


@pytest.mark.parametrize("name", sorted(DAEMONS))
def test_unknown_keys_and_bad_values_are_refused_naming_the_field(name: str, tmp_path: Path) -> None:
    case = DAEMONS[name]
    path = toml(tmp_path / "unknown.toml", case, None)
    path.write_text(path.read_text() + "no_such_knob = 1\n")
    with pytest.raises(ConfigError, match="no_such_knob: Extra inputs are not permitted"):
        case.settings.from_argv(["--config", str(path)])
    with pytest.raises(ConfigError, match=f"{case.field}: "):
        case.settings.from_argv(["--config", str(toml(tmp_path / "bad.toml", case, case.bad))])
    with pytest.raises(ConfigError, match="does not exist"):
        case.settings.from_argv(["--config", str(tmp_path / "missing.toml")])


def test_aggregator_members_from_a_flag_a_variable_or_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = ["--job", "j", "--every", "1", "--per-round", "1"]
    assert AggregatorSettings.from_argv([*base, "--members", "a, b"]).members == ("a", "b")
    monkeypatch.setenv("CLUE_AGGREGATOR_MEMBERS", "c,d")
    assert AggregatorSettings.from_argv(base).members == ("c", "d")
    monkeypatch.delenv("CLUE_AGGREGATOR_MEMBERS")
    path = toml(tmp_path / "settings.toml", DAEMONS["clue-aggregator"], None)
    assert AggregatorSettings.from_argv(["--config", str(path)]).members == ("a", "b")


class Knobs(BaseModel):
    depth: int = 1


class Demo(DaemonSettings, BrokerSettings):
    model_config = SettingsConfigDict(env_prefix="CLUE_DEMO_")

    program: ClassVar[str] = "clue-demo"
    fast: bool = Field(False, description="go fast")
    knobs: Knobs = Field(default_factory=Knobs, description="a table in the file, no flag")


def test_flags_come_from_the_fields() -> None:
    usage = Demo.parser().format_help()
    assert "--fast " in usage and "--tls-key-password-file" in usage and "$CLUE_DEMO_FAST" in usage
    assert "--knobs" not in usage
    assert Demo.from_argv(["--fast", "--log-level", "debug"]).model_dump(include={"fast", "log_level"}) == {"fast": True, "log_level": "DEBUG"}


def test_credentials_are_files_found_in_the_credentials_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "demo.password").write_text("secret\n")
    with pytest.raises(ConfigError, match="password_file: .*demo.password does not exist"):
        Demo.load(password_file="demo.password")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    settings = Demo.load(username="u", password_file="demo.password", broker="/run/mosquitto.sock")
    assert settings.password_file == "demo.password", "kept as given: a credential name"
    assert settings.client_kwargs() == {
        "username": "u",
        "password_file": creds / "demo.password",
        "tls_ca": None,
        "tls_cert": None,
        "tls_key": None,
        "tls_key_password_file": None,
    }
    assert settings.broker == "unix:///run/mosquitto.sock", "a bare socket path"


# --- the daemons as processes ----------------------------------------------------------------


def start(case: Case, args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", case.module, "--broker", "mqtt://127.0.0.1:1", *args],
        cwd=REPO,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("CLUE_")}, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def runs(proc: subprocess.Popen[str], line: str, timeout: float = 60.0) -> str:
    """Wait for `line` in its log, then SIGTERM it and expect exit 0; its stderr."""
    assert proc.stderr is not None
    seen = []
    deadline = time.monotonic() + timeout
    while not any(line in s for s in seen):
        text = proc.stderr.readline()
        assert text or proc.poll() is None, "".join(seen)
        assert time.monotonic() < deadline, f"no {line!r} in {''.join(seen)}"
        seen.append(text)
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=20)
    assert proc.returncode == EXIT_OK, "".join(seen) + rest
    return "".join(seen) + rest


@pytest.mark.integration
@pytest.mark.timeout(180)
@pytest.mark.parametrize("name", sorted(DAEMONS))
def test_a_bad_value_from_any_source_exits_78_and_a_later_source_mends_it(name: str, tmp_path: Path) -> None:
    case = DAEMONS[name]
    good, bad = case.good[0], case.bad
    bad_file = ["--config", str(toml(tmp_path / "bad.toml", case, bad))]
    fine_file = ["--config", str(toml(tmp_path / "fine.toml", case, None))]
    # All at once: each pays for its imports (the aggregator's, torch).
    refused = {
        "file": start(case, bad_file, {}),
        "variable": start(case, fine_file, {case.variable: bad}),
        "flag": start(case, [*fine_file, case.flag, bad], {}),
    }
    mended = {
        "variable over file": start(case, bad_file, {case.variable: good}),
        "flag over variable": start(case, [*fine_file, case.flag, good], {case.variable: bad}),
    }
    try:
        for source, proc in refused.items():
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == EXIT_CONFIG, (source, err)
            assert err.startswith(f"{name}: error: invalid settings: {case.field}: "), (source, err)
        for proc in mended.values():
            runs(proc, case.running)
    finally:
        for proc in [*refused.values(), *mended.values()]:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
