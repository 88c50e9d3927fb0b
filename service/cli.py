"""The command line of every daemon: usage errors exit `EXIT_CONFIG`, not argparse's 2.

systemd's `Restart=on-failure` restarts a daemon that exits 2 for ever; 78 is in every unit's
`RestartPreventExitStatus=`, so a unit with a mistyped flag stops at once.

>>> try:
...     ServiceArgumentParser(prog="clue-x").parse_args(["--bogus"])
... except SystemExit as exc:
...     print(exc.code)
78
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from service.exit_codes import EXIT_CONFIG


class ServiceArgumentParser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` whose errors (unknown flag, bad value, missing option) print
    the usage and the message, as argparse does, and exit `EXIT_CONFIG`. `--help` still exits 0."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_CONFIG, f"{self.prog}: error: {message}\n")


__all__ = ["ServiceArgumentParser"]
