"""What the tests share: waiting for a condition or a message, skipping when a tool is missing,
asking a broker whether a session is left.

``tests/`` is on pytest's ``pythonpath`` (pyproject.toml), so a test module imports these as
``from support import wait_until``; the fleet of real daemons is in ``support.fleet`` (its
``fleet`` fixture is in ``tests/conftest.py``) and the hostile peers in ``support.peers``.

Tests that need a broker take the ``mosquitto`` or ``fresh_mosquitto`` fixture, which skips when
Mosquitto is not installed; ``requires_mosquitto`` is for tests that start a broker of their own.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

MOSQUITTO_MISSING = "mosquitto not installed (Debian package 'mosquitto')"
OPENSSL_MISSING = "needs openssl (Debian package 'openssl')"


def mosquitto_available() -> bool:
    """Whether a ``mosquitto`` binary is on PATH or in /usr/sbin (Debian puts it there)."""
    return shutil.which("mosquitto") is not None or os.access("/usr/sbin/mosquitto", os.X_OK)


#: Skip a test (or, as ``pytestmark``, a module) that starts a Mosquitto of its own.
requires_mosquitto = pytest.mark.skipif(not mosquitto_available(), reason=MOSQUITTO_MISSING)
#: Skip a test that generates certificates with ``openssl``.
requires_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason=OPENSSL_MISSING)


def wait_until(
    predicate: Callable[[], T], timeout: float = 10.0, what: str | Callable[[], str] = "condition", interval: float = 0.01
) -> T:
    """Poll ``predicate`` until it returns something true, and return that; past ``timeout``
    seconds raise ``AssertionError`` naming ``what`` (a callable is called then, to say what it saw)."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what() if callable(what) else what}")
        time.sleep(interval)
    return value


def session_left(broker, client_id: str) -> bool:
    """Whether ``broker`` (a ``PrivateMosquitto``) still holds a session for ``client_id``: a probe
    resumes it. The probe's own session lasts 1 s after it leaves."""
    from broker.client import MqttClient

    probe = MqttClient.from_url(broker.url, client_id=client_id, clean_start=False, session_expiry=1)
    probe.start()
    try:
        assert probe.wait_connected(10), "the probe could not connect"
        return probe.stats()["session_present"] > 0
    finally:
        probe.stop()


def next_message(client, kind: type, where: Callable[[Any], bool] = lambda m: True, timeout: float = 90) -> Any:
    """The next message of type ``kind`` that ``where`` accepts (the messages before it are dropped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        item = client.get(timeout=0.2)
        message = getattr(item, "message", None)
        if isinstance(message, kind) and where(message):
            return message
    raise AssertionError(f"no {kind.__name__} within {timeout} s")


def scrape(url: str, **urlopen: Any) -> dict[str, float]:
    """One scrape of a Prometheus endpoint: ``{'name{label="value",…}': value}``, labels sorted
    (``'clue_agent_batches_served_total'``, ``'clue_mds_nodes{arch_id="a",lineage="b"}'``)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=10, **urlopen).read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples
