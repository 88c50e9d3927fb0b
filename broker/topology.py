"""Topologies of CLUE Edge as data: where knowledge transfer goes, and who may use which topic.

`kt_mode` is one config value. `direct`: the target asks the helper on `node/{helper}/kt`.
`relay`: the target asks the trusted relay on `relay/kt`, and the relay picks the helper, so
neither learns the other's id. Agent code does not branch on the mode beyond `kt_channel`.

The access tables below are what the broker enforces: `broker.acl` renders them into the
Mosquitto ACL files under `broker/mosquitto/`. A node's identity is its certificate CN (Mosquitto's
`use_identity_as_username`); `SELF` stands for it. Role identities (`ROLES`) are reserved names:
no node may be called `mds`, `relay`, … (`broker.certs` refuses to issue such a node cert).

>>> kt_channel("direct", "edge-7")
'clue/v1/node/edge-7/kt'
>>> kt_channel("relay")
'clue/v1/relay/kt'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from broker import topics
from broker.errors import TopicError

KtMode = Literal["direct", "relay"]
KT_MODES: tuple[str, ...] = get_args(KtMode)

Access = Literal["read", "write", "readwrite"]

#: Placeholder for the identity's own node id in node grants (Mosquitto's `%u`).
SELF = "%u"


def kt_channel(mode: KtMode, helper_id: str | None = None) -> str:
    """The topic a target sends its `KtRequest` to: the helper's `kt` topic, or the relay's."""
    if mode == "direct":
        if helper_id is None:
            raise TopicError("direct knowledge transfer needs the helper's node id")
        return topics.node_kt(helper_id)
    if mode == "relay":
        return topics.relay_kt()
    raise ValueError(f"unknown kt_mode {mode!r}; expected one of {KT_MODES}")


@dataclass(frozen=True)
class Grant:
    """Access to one topic filter (`SELF` in it: the identity's own node id)."""

    access: Access
    topic: str
    why: str = ""


def _own(leaf: str) -> str:
    if leaf not in topics.NODE_LEAVES:
        raise TopicError(f"unknown node topic leaf {leaf!r}")
    return f"{topics.PREFIX}/node/{SELF}/{leaf}"


def _every(leaf: str) -> str:
    if leaf not in topics.NODE_LEAVES:
        raise TopicError(f"unknown node topic leaf {leaf!r}")
    return f"{topics.PREFIX}/node/+/{leaf}"


#: What every node may do with its own topics, whatever the topology.
NODE_OWN: tuple[Grant, ...] = (
    *(Grant("write", _own(leaf), "outbound") for leaf in ("prediction", "meta", "status", "events", "config/ack")),
    *(Grant("read", _own(leaf), "inbound") for leaf in ("batch", "labels", "config", "kt", "reply")),
    Grant("write", f"{topics.PREFIX}/fl/+/update/{SELF}", "FedAvg baseline: its own model update"),
)

#: What every node may do on shared topics, by topology. `direct` is `relay` plus writing other
#: nodes' `kt` (asking a helper) and `reply` (a helper answering): that is what direct means.
#: `relay/kt` stays writable in `direct` so an operator can switch `kt_mode` at run time.
NODE_SHARED: dict[str, tuple[Grant, ...]] = {
    "relay": (
        Grant("write", topics.mds_query(), "asks the MdS for helpers"),
        Grant("write", topics.relay_kt(), "asks the relay for knowledge"),
        Grant("write", f"{topics.PREFIX}/relay/+/reply", "answers the relay (as a helper)"),
        Grant("read", topics.fleet_config(), "fleet-wide config patches"),
        Grant("read", f"{topics.PREFIX}/fl/+/global", "FedAvg baseline: the global model"),
        Grant("write", f"{topics.PREFIX}/app/+/reply", "answers an application's batch or labels on its reply topic"),
    ),
}
NODE_SHARED["direct"] = (
    *NODE_SHARED["relay"],
    Grant("write", _every("kt"), "asks a helper directly"),
    Grant("write", _every("reply"), "answers a target directly"),
)

#: The service identities and exactly what their roles need (the same in both topologies).
ROLES: dict[str, tuple[Grant, ...]] = {
    "mds": (
        Grant("read", topics.all_meta(), "node metadata"),
        Grant("read", topics.all_status(), "liveness"),
        Grant("read", topics.mds_query(), "helper queries (also as $share/mds/...)"),
        Grant("write", _every("reply"), "helper lists"),
        Grant("write", f"{topics.PREFIX}/relay/+/reply", "helper lists for the relay"),
    ),
    "relay": (
        Grant("read", topics.relay_kt(), "KT requests (also as $share/relay/...)"),
        Grant("read", f"{topics.PREFIX}/relay/+/reply", "answers of the MdS and helpers to relay instances"),
        Grant("read", topics.all_meta(), "the asker's class histogram for its MdS query"),
        Grant("write", topics.mds_query(), "asks the MdS for helpers"),
        Grant("write", _every("kt"), "forwards a request to the chosen helper"),
        Grant("write", _every("reply"), "passes the blob back to the target"),
    ),
    "operator": (
        Grant("read", topics.all_status(), "fleet dashboard"),
        Grant("read", topics.all_meta(), "fleet dashboard"),
        Grant("read", topics.all_events(), "fleet dashboard"),
        Grant("read", topics.all_predictions(), "clue-ctl top: batches per second and served error"),
        Grant("read", _every("config/ack"), "results of config patches and current configs"),
        Grant("write", _every("config"), "per-node config patches"),
        Grant("write", topics.fleet_config(), "fleet-wide config patches"),
    ),
    "feeder": (
        Grant("write", _every("batch"), "simulator: request batches"),
        Grant("write", _every("labels"), "simulator: labels that come later"),
    ),
    "app": (
        Grant("write", _every("batch"), "an application: request batches"),
        Grant("write", _every("labels"), "an application: labels that come later"),
        Grant("read", topics.app_reply("app"), "an application: predictions and acknowledgements asked for"),
    ),
    "collector": (
        Grant("read", topics.all_predictions(), "simulator: predictions"),
        Grant("read", topics.all_events(), "simulator: events"),
        Grant("read", topics.all_status(), "simulator: liveness (clue-sim feed waits for every node online)"),
    ),
    "aggregator": (
        Grant("read", f"{topics.PREFIX}/fl/+/update/+", "FedAvg baseline: node updates"),
        Grant("write", f"{topics.PREFIX}/fl/+/global", "FedAvg baseline: the global model"),
    ),
    "bridge": (
        Grant("readwrite", f"{topics.PREFIX}/#", "a site broker's bridge: its own broker enforces the node ACL"),
    ),
}


def node_grants(topology: KtMode) -> tuple[Grant, ...]:
    """Every grant of a node identity in `topology`."""
    if topology not in NODE_SHARED:
        raise ValueError(f"unknown topology {topology!r}; expected one of {KT_MODES}")
    return NODE_OWN + NODE_SHARED[topology]


def is_role(identity: str) -> bool:
    """True for a reserved service identity (`mds`, `relay`, …)."""
    return identity in ROLES


__all__ = [
    "Access",
    "Grant",
    "KT_MODES",
    "KtMode",
    "NODE_OWN",
    "NODE_SHARED",
    "ROLES",
    "SELF",
    "is_role",
    "kt_channel",
    "node_grants",
]
