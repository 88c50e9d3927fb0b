"""The bus of CLUE Edge: topic names (`broker.topics`), wire schemas and codec (`broker.wire`),
chunking (`broker.chunking`), the paho-mqtt wrapper (`broker.client`), errors (`broker.errors`)
and a private Mosquitto launcher (`broker.launcher`).

The main names are re-exported lazily, so `import broker.topics` stays cheap:

>>> from broker import MqttClient, PrivateMosquitto, decode, encode   # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MqttClient": "broker.client",
    "ClientSettings": "broker.client",
    "Responder": "broker.client",
    "Inbound": "broker.client",
    "ErrorEvent": "broker.client",
    "Will": "broker.client",
    "parse_broker_url": "broker.client",
    "PrivateMosquitto": "broker.launcher",
    "Listener": "broker.launcher",
    "encode": "broker.wire",
    "decode": "broker.wire",
    "decode_config": "broker.wire",
    "BusError": "broker.errors",
    "WireError": "broker.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'broker' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
