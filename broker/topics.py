"""Every MQTT topic name of CLUE Edge (ARCHITECTURE.md §4). No other module spells a topic.

All topics live under `PREFIX` (`clue/v1`, no leading slash: a leading slash would add an empty
first level). Node ids and job ids are validated (`[A-Za-z0-9_.-]{1,64}`), so an id can never
inject a level separator or a wildcard.

Byte accounting: `topic_class(topic)` names the class a topic's bytes are counted under
(`meta`, `query`, `kt`, `fl`, `batch`, `config`, `prediction`, `events`, `status`, `reply`,
`other`). A reply topic carries both MdS replies and KT blobs, so the client counts a decoded
message by its *message type* first (`HelpQuery`/`HelperList` -> `query`, `KtRequest`/`KtBlob` ->
`kt`, see `broker.wire`), then by an explicit class given on publish, and only then by topic.

>>> node_meta("edge-1")
'clue/v1/node/edge-1/meta'
>>> parse_node_topic("clue/v1/node/edge-1/config/ack")
('edge-1', 'config/ack')
>>> topic_class(mds_query_shared())
'query'
"""

from __future__ import annotations

import re
from typing import Literal, get_args

from broker.errors import TopicError

PREFIX = "clue/v1"

TopicClass = Literal[
    "meta", "query", "kt", "fl", "batch", "config", "prediction", "events", "status", "reply", "other"
]
TOPIC_CLASSES: tuple[str, ...] = get_args(TopicClass)

#: Leaves of `node/{id}/…` topics and the byte class of each.
NODE_LEAVES: dict[str, TopicClass] = {
    "batch": "batch",
    "prediction": "prediction",
    "meta": "meta",
    "status": "status",
    "events": "events",
    "config": "config",
    "config/ack": "config",
    "kt": "kt",
    "reply": "reply",
}

_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_SHARE_RE = re.compile(r"^\$share/([^/#+]+)/(.+)$")
MAX_TOPIC_LEN = 512

STATUS_ONLINE = b"online"
STATUS_OFFLINE = b"offline"


# --- ids -------------------------------------------------------------------------------------


def validate_node_id(node_id: str) -> str:
    """Return `node_id` if it matches `[A-Za-z0-9_.-]{1,64}`, else raise `TopicError`."""
    if not isinstance(node_id, str) or not _ID_RE.fullmatch(node_id) or node_id in (".", ".."):
        raise TopicError(f"invalid node id {node_id!r}: expected [A-Za-z0-9_.-]{{1,64}}")
    return node_id


def is_valid_node_id(node_id: object) -> bool:
    """True when `node_id` is a valid node (or job) id."""
    try:
        validate_node_id(node_id)  # type: ignore[arg-type]
    except TopicError:
        return False
    return True


validate_job_id = validate_node_id


def validate_publish_topic(topic: str) -> str:
    """Return `topic` if it can be published to (non-empty, no wildcard, no NUL, bounded)."""
    if not isinstance(topic, str) or not topic:
        raise TopicError("empty topic")
    if len(topic) > MAX_TOPIC_LEN:
        raise TopicError(f"topic longer than {MAX_TOPIC_LEN} characters")
    if "+" in topic or "#" in topic or "\x00" in topic:
        raise TopicError(f"topic {topic!r} contains a wildcard or NUL")
    if topic.startswith("$"):
        raise TopicError(f"topic {topic!r} starts with '$' (reserved for the broker)")
    return topic


def validate_filter(topic_filter: str) -> str:
    """Return `topic_filter` if it is a valid subscription filter (shared filters allowed)."""
    if not isinstance(topic_filter, str) or not topic_filter or "\x00" in topic_filter:
        raise TopicError("empty topic filter or NUL in it")
    if len(topic_filter) > MAX_TOPIC_LEN:
        raise TopicError(f"topic filter longer than {MAX_TOPIC_LEN} characters")
    inner = strip_share(topic_filter)
    levels = inner.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise TopicError(f"'#' must be a whole last level in {topic_filter!r}")
        if "+" in level and level != "+":
            raise TopicError(f"'+' must be a whole level in {topic_filter!r}")
    return topic_filter


def strip_share(topic_filter: str) -> str:
    """`$share/group/a/b` -> `a/b`; other filters unchanged."""
    m = _SHARE_RE.match(topic_filter)
    return m.group(2) if m else topic_filter


def matches(topic_filter: str, topic: str) -> bool:
    """True when `topic` matches `topic_filter` (shared subscriptions understood)."""
    inner = strip_share(topic_filter)
    f_levels = inner.split("/")
    t_levels = topic.split("/")
    if topic.startswith("$") and f_levels[0] in ("+", "#"):
        return False
    for i, f in enumerate(f_levels):
        if f == "#":
            return True
        if i >= len(t_levels):
            return False
        if f != "+" and f != t_levels[i]:
            return False
    return len(t_levels) == len(f_levels)


# --- node topics -----------------------------------------------------------------------------


def _node(node_id: str, leaf: str) -> str:
    return f"{PREFIX}/node/{validate_node_id(node_id)}/{leaf}"


def node_batch(node_id: str) -> str:
    """Request batches for one node (feeder -> agent, QoS 1)."""
    return _node(node_id, "batch")


def node_prediction(node_id: str) -> str:
    """Predictions of one node (agent ->, QoS 0)."""
    return _node(node_id, "prediction")


def node_meta(node_id: str) -> str:
    """Node metadata for the MdS (agent -> MdS, QoS 1, retained)."""
    return _node(node_id, "meta")


def node_status(node_id: str) -> str:
    """`online` / `offline` (the will), QoS 1, retained."""
    return _node(node_id, "status")


def node_events(node_id: str) -> str:
    """Events of one node (drift, helper installed, …), QoS 1."""
    return _node(node_id, "events")


def node_config(node_id: str) -> str:
    """Config patches for one node (operator -> agent; JSON or msgpack)."""
    return _node(node_id, "config")


def node_config_ack(node_id: str) -> str:
    """Config acknowledgements of one node (agent -> operator)."""
    return _node(node_id, "config/ack")


def node_kt(node_id: str) -> str:
    """KT requests to one helper node (direct mode)."""
    return _node(node_id, "kt")


def node_reply(node_id: str) -> str:
    """Replies to one node's requests (MdS / helper / relay -> agent)."""
    return _node(node_id, "reply")


# --- fleet, services, FL ---------------------------------------------------------------------


def fleet_config() -> str:
    """Config patches for every agent."""
    return f"{PREFIX}/fleet/config"


def mds_query() -> str:
    """Helper queries (agent -> MdS)."""
    return f"{PREFIX}/mds/query"


def mds_query_shared(group: str = "mds") -> str:
    """Shared subscription over `mds_query()` so several MdS instances split the load."""
    validate_node_id(group)
    return f"$share/{group}/{mds_query()}"


def relay_kt() -> str:
    """KT requests to the trusted relay (no helper id)."""
    return f"{PREFIX}/relay/kt"


def relay_reply(relay_id: str) -> str:
    """Replies addressed to a relay instance (helper -> relay)."""
    return f"{PREFIX}/relay/{validate_node_id(relay_id)}/reply"


def fl_update(job: str, node_id: str) -> str:
    """FedAvg baseline: one node's model update for `job`."""
    return f"{PREFIX}/fl/{validate_job_id(job)}/update/{validate_node_id(node_id)}"


def fl_updates(job: str) -> str:
    """FedAvg baseline: filter over every node's update for `job`."""
    return f"{PREFIX}/fl/{validate_job_id(job)}/update/+"


def fl_global(job: str) -> str:
    """FedAvg baseline: the global model of `job`."""
    return f"{PREFIX}/fl/{validate_job_id(job)}/global"


# --- wildcards -------------------------------------------------------------------------------


def all_meta() -> str:
    """`clue/v1/node/+/meta`: every node's metadata (the MdS subscribes to it)."""
    return f"{PREFIX}/node/+/meta"


def all_status() -> str:
    """`clue/v1/node/+/status`: every node's liveness."""
    return f"{PREFIX}/node/+/status"


def all_events() -> str:
    """`clue/v1/node/+/events`."""
    return f"{PREFIX}/node/+/events"


def all_predictions() -> str:
    """`clue/v1/node/+/prediction`."""
    return f"{PREFIX}/node/+/prediction"


def all_node_topics(node_id: str) -> str:
    """`clue/v1/node/{id}/#`."""
    return f"{PREFIX}/node/{validate_node_id(node_id)}/#"


# --- parsing ---------------------------------------------------------------------------------


def parse_node_topic(topic: str) -> tuple[str, str]:
    """`clue/v1/node/{id}/{leaf}` -> `(id, leaf)`; raise `TopicError` for anything else."""
    if not isinstance(topic, str):
        raise TopicError("topic is not a string")
    head = f"{PREFIX}/node/"
    if not topic.startswith(head):
        raise TopicError(f"not a node topic: {topic[:80]!r}")
    rest = topic[len(head):]
    node_id, sep, leaf = rest.partition("/")
    if not sep or leaf not in NODE_LEAVES:
        raise TopicError(f"unknown node topic leaf in {topic[:80]!r}")
    return validate_node_id(node_id), leaf


def topic_class(topic: str) -> TopicClass:
    """The byte-accounting class of a topic (or topic filter); `other` when not ours."""
    if not isinstance(topic, str):
        return "other"
    topic = strip_share(topic)
    if not topic.startswith(PREFIX + "/"):
        return "other"
    levels = topic[len(PREFIX) + 1:].split("/")
    head = levels[0]
    if head == "node" and len(levels) >= 3:
        return NODE_LEAVES.get("/".join(levels[2:]), "other")
    if head == "fleet" and levels[1:] == ["config"]:
        return "config"
    if head == "mds" and levels[1:] == ["query"]:
        return "query"
    if head == "relay":
        if levels[1:] == ["kt"]:
            return "kt"
        if len(levels) == 3 and levels[2] == "reply":
            return "reply"
        return "other"
    if head == "fl":
        return "fl"
    return "other"


def is_reply_topic(topic: str) -> bool:
    """True for topics on which replies are delivered (`node/{id}/reply`, `relay/{id}/reply`)."""
    return topic_class(topic) == "reply"


__all__ = [
    "NODE_LEAVES",
    "PREFIX",
    "STATUS_OFFLINE",
    "STATUS_ONLINE",
    "TOPIC_CLASSES",
    "TopicClass",
    "all_events",
    "all_meta",
    "all_node_topics",
    "all_predictions",
    "all_status",
    "fl_global",
    "fl_update",
    "fl_updates",
    "fleet_config",
    "is_reply_topic",
    "is_valid_node_id",
    "matches",
    "mds_query",
    "mds_query_shared",
    "node_batch",
    "node_config",
    "node_config_ack",
    "node_events",
    "node_kt",
    "node_meta",
    "node_prediction",
    "node_reply",
    "node_status",
    "parse_node_topic",
    "relay_kt",
    "relay_reply",
    "strip_share",
    "topic_class",
    "validate_filter",
    "validate_job_id",
    "validate_node_id",
    "validate_publish_topic",
]
