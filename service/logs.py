"""Logging setup for the daemons: the journal under systemd, plain stderr elsewhere.

Under systemd with systemd-python, records go to journald with their fields (priority, logger,
code location). Under systemd without it, stderr is the journal already: lines carry a ``<N>``
syslog priority prefix (journald parses it, ``SyslogLevelPrefix=`` defaults to on) and no
timestamp, since journald stamps every line itself. Elsewhere: timestamped lines on stderr.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

try:
    from systemd.journal import JournalHandler
except ImportError:
    JournalHandler = None

_PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_JOURNAL_STDERR_FORMAT = "%(name)s: %(message)s"


def under_systemd(environ: Mapping[str, str] | None = None) -> bool:
    """True when started by systemd (``$INVOCATION_ID``) or with stderr on the journal (``$JOURNAL_STREAM``)."""
    env = os.environ if environ is None else environ
    return bool(env.get("INVOCATION_ID") or env.get("JOURNAL_STREAM"))


class SyslogPrefixFormatter(logging.Formatter):
    """Prefixes each line with its sd-daemon(3) priority, ``<3>`` for errors to ``<7>`` for debug."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def _priority(levelno: int) -> int:
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def configure_logging(
    level: int | str = logging.INFO,
    *,
    identifier: str,
    journald: bool | None = None,
    stream: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> logging.Handler:
    """Install one handler on the root logger (replacing any others) and return it.

    ``journald``: None picks the journal when ``under_systemd()`` and systemd-python is importable;
    True asks for it (falls back to prefixed stderr, with a warning, without systemd-python); False
    forces stderr (still prefixed, without timestamps, under systemd). ``identifier`` is the
    journal's SYSLOG_IDENTIFIER, the daemon's name (``clue-mds``); ``stream`` defaults to stderr.
    """
    systemd = under_systemd(environ)
    want_journal = systemd if journald is None else journald
    handler: logging.Handler
    if want_journal and JournalHandler is not None:
        handler = JournalHandler(SYSLOG_IDENTIFIER=identifier)
    else:
        handler = logging.StreamHandler(stream or sys.stderr)
        # Under systemd stderr is the journal even when the JournalHandler is not used.
        journal_stderr = systemd or want_journal
        handler.setFormatter(
            SyslogPrefixFormatter(_JOURNAL_STDERR_FORMAT) if journal_stderr else logging.Formatter(_PLAIN_FORMAT)
        )
    logging.basicConfig(level=level, handlers=[handler], force=True)
    if journald and JournalHandler is None:
        logging.getLogger(__name__).warning("journald logging requested but systemd-python is missing; using stderr")
    return handler
