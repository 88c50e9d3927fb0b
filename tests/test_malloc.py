"""agent/malloc.py: fixed glibc thresholds stop a worker thread's freed tensors being faulted back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent import malloc
from agent.malloc import is_glibc, operator_tuned, retain_freed_memory

ROOT = Path(__file__).resolve().parents[1]


# Like the agent: a worker thread allocates a batch's worth of tensors and frees them, again and
# again. Prints the minor page faults per round once glibc's adaptive thresholds have settled.
_ROUNDS = """
import resource, sys, threading
import numpy as np
from agent.malloc import retain_freed_memory
print(retain_freed_memory(int(sys.argv[1]) << 20))
out = []
def rounds():
    for _ in range(5):
        arrays = [np.ones(150_000, np.float32) for _ in range(6)]
        del arrays
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for _ in range(50):
        arrays = [np.ones(150_000, np.float32) for _ in range(6)]
        del arrays
    out.append((resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before) / 50)
worker = threading.Thread(target=rounds)
worker.start()
worker.join()
print(out[0])
"""


def _faults_per_round(retain_mb: int, **env: str) -> tuple[bool, float]:
    clean = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), **env}
    proc = subprocess.run([sys.executable, "-c", _ROUNDS, str(retain_mb)], capture_output=True, text=True, timeout=120, env=clean)
    assert proc.returncode == 0, proc.stderr
    applied, faults = proc.stdout.split()
    return applied == "True", float(faults)


@pytest.mark.skipif(not is_glibc(), reason="glibc's mallopt only")
def test_fixed_thresholds_stop_the_page_faults_of_each_round() -> None:
    adaptive_applied, adaptive = _faults_per_round(0)
    fixed_applied, fixed = _faults_per_round(64)
    assert not adaptive_applied and fixed_applied
    # 6 arrays of ~600 KiB: glibc's own thresholds return them to the kernel every round.
    assert adaptive >= 500, adaptive
    assert fixed <= 5, fixed


@pytest.mark.skipif(not is_glibc(), reason="glibc's mallopt only")
def test_the_operators_environment_wins() -> None:
    applied, faults = _faults_per_round(64, MALLOC_TRIM_THRESHOLD_="131072")
    assert not applied
    assert faults >= 500  # the trim threshold the operator chose, not ours


@pytest.mark.parametrize(
    "environ, tuned",
    [
        ({}, False),
        ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, False),
        ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.trim_threshold=1048576"}, True),
        ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576"}, True),
        ({"MALLOC_MMAP_THRESHOLD_": "1048576"}, True),
        ({"MALLOC_TRIM_THRESHOLD_": "0"}, True),
    ],
)
def test_operator_tuned_reads_both_ways_of_setting_the_thresholds(environ: dict[str, str], tuned: bool) -> None:
    assert operator_tuned(environ) is tuned


def test_zero_leaves_malloc_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(malloc, "_libc", lambda: pytest.fail("mallopt must not be looked up"))
    assert retain_freed_memory(0) is False


def test_no_glibc_no_call(monkeypatch: pytest.MonkeyPatch) -> None:
    class Musl:  # a C library with a mallopt whose parameter numbers may mean something else
        def mallopt(self, *args: int) -> int:
            raise AssertionError("called a non-glibc mallopt")

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(malloc, "_libc", lambda: Musl())
    assert retain_freed_memory(64 << 20) is False


@pytest.mark.parametrize("value", [-1, 2048, "lots", 1.5])
def test_settings_refuse_an_out_of_range_retain(value: object, tmp_path: Path) -> None:
    from agent.errors import ConfigError
    from agent.settings import load_settings

    with pytest.raises(ConfigError, match="malloc_retain_mb"):
        load_settings(node_id="edge-1", state_dir=str(tmp_path), malloc_retain_mb=value)
