"""`service.cli`: a bad command line exits 78 (sysexits' EX_CONFIG) with the usage, never
argparse's 2, which systemd's `Restart=on-failure` would restart for ever."""

from __future__ import annotations

import subprocess
import sys

import pytest

from service.cli import ServiceArgumentParser
from service.exit_codes import EXIT_CONFIG

#: Each daemon's program name and how it is started as a process. The aggregator gets its required
#: options, so that the unknown flag is the only error.
DAEMONS = {
    "clue-agent": ["-m", "agent"],
    "clue-mds": ["-m", "mds"],
    "clue-relay": ["-m", "broker.relay"],
    "clue-aggregator": ["-m", "edge_sim.aggregator", "--job", "j", "--every", "1", "--members", "a", "--per-round", "1"],
}


def _parser() -> ServiceArgumentParser:
    p = ServiceArgumentParser(prog="clue-test")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--level", choices=["INFO", "DEBUG"], default="INFO")
    p.add_argument("--job", required=True)
    return p


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--job", "j", "--bogus"], "unrecognized arguments: --bogus"),
        (["--job", "j", "--count", "many"], "argument --count: invalid int value: 'many'"),
        (["--job", "j", "--level", "LOUD"], "argument --level: invalid choice: 'LOUD'"),
        ([], "the following arguments are required: --job"),
    ],
    ids=["unknown-flag", "bad-value", "bad-choice", "missing"],
)
def test_usage_errors_exit_78_with_usage_and_message(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        _parser().parse_args(argv)
    assert info.value.code == EXIT_CONFIG == 78
    err = capsys.readouterr().err
    assert err.startswith("usage: clue-test ")
    assert f"clue-test: error: {message}" in err


def test_help_still_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        _parser().parse_args(["--help"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: clue-test ")


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_every_daemon_exits_78_with_its_usage_on_an_unknown_flag() -> None:
    # All at once: the agent and the aggregator each pay for importing torch.
    runs = {
        prog: subprocess.Popen(
            [sys.executable, *argv, "--no-such-flag"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for prog, argv in DAEMONS.items()
    }
    for prog, run in runs.items():
        _, err = run.communicate(timeout=100)
        assert run.returncode == EXIT_CONFIG, (prog, err)
        assert err.startswith(f"usage: {prog} "), (prog, err)
        assert f"{prog}: error: unrecognized arguments: --no-such-flag" in err, (prog, err)
