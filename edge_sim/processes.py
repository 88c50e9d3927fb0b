"""Starting the real daemons as child processes: what the simulator and the end-to-end tests run.

Each child gets its own log file, torch threads set explicitly, and is stopped with SIGTERM (then
SIGKILL after a grace period). Settings travel as ``CLUE_*`` environment variables, exactly as an
operator would give them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Child:
    """One daemon process and its log."""

    name: str
    process: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM, wait, then SIGKILL; returns the exit code."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()

    def kill(self) -> int:
        self.process.kill()
        return self.process.wait()


def _env(extra: Mapping[str, str], threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def spawn(name: str, argv: list[str], log_dir: Path, *, env: Mapping[str, str] | None = None, threads: int = 1) -> Child:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_env(env or {}, threads)
        )
    return Child(name, process, log_path)


def agent_env(settings: Mapping[str, Any]) -> dict[str, str]:
    """``CLUE_*`` variables for agent settings; nested models (learner, daemon) as JSON."""
    env = {}
    for key, value in settings.items():
        name = f"CLUE_{key.upper()}"
        if isinstance(value, (dict, list)):
            env[name] = json.dumps(value)
        elif isinstance(value, bool):
            env[name] = "true" if value else "false"
        else:
            env[name] = str(value)
    return env


def spawn_agent(node_id: str, broker_url: str, state_dir: Path, log_dir: Path, *, settings: Mapping[str, Any] | None = None, threads: int = 1, env: Mapping[str, str] | None = None) -> Child:
    """A ``clue-agent`` process for ``node_id``."""
    merged = {"node_id": node_id, "broker": broker_url, "state_dir": str(state_dir), "torch_threads": threads}
    merged.update(settings or {})
    return spawn(node_id, [sys.executable, "-m", "agent"], log_dir, env={**agent_env(merged), **(env or {})}, threads=threads)


def spawn_mds(broker_url: str, db_path: Path, log_dir: Path, *, name: str = "mds", extra_args: list[str] | None = None) -> Child:
    """A ``clue-mds`` process."""
    argv = [sys.executable, "-m", "mds", "--broker", broker_url, "--db", str(db_path), "--client-id", name]
    return spawn(name, argv + list(extra_args or []), log_dir)
