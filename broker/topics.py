"""Every MQTT topic name of CLUE Edge (ARCHITECTURE.md §4). No other module spells a topic.

All topics live under `PREFIX` (`clue/v1`, no leading slash: a leading slash would add an empty
first level). Node ids and job ids are validated, so an id can never inject a level separator or
a wildcard: `validate_node_id` is the one rule (`broker.wire.NodeId` uses it; so should settings):
1-64 characters from `[A-Za-z0-9_.-]`, and not `.` or `..` (which a file name or path would read
as "here" or "up").

Byte accounting: `topic_class(topic)` names the class a topic's bytes are counted under
(`meta`, `query`, `kt`, `fl`, `batch`, `labels`, `config`, `prediction`, `events`, `status`,
`reply`, `other`). A reply topic carries both MdS replies and KT blobs, so the client counts a decoded
message by its *message type* first (`HelpQuery`/`HelperList` -> `query`, `KtRequest`/`KtBlob` ->
`kt`, see `broker.wire`), then by an explicit class given on publish, and only then by topic.

What a topic may carry (ARCHITECTURE.md §4: each topic accepts only its own message types, and
every size limit applies to the reassembled message): `topic_rule(topic)` gives the default
`TopicRule` of the topic's kind (`topic_kind`): the wire `type` names it accepts and the largest
message, after chunk reassembly, a subscriber takes. The client applies it to every subscription
that does not pass its own `accept` / `max_bytes`.

>>> node_meta("edge-1")
'clue/v1/node/edge-1/meta'
>>> parse_node_topic("clue/v1/node/edge-1/config/ack")
('edge-1', 'config/ack')
>>> topic_class(mds_query_shared())
'query'
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, get_args

from broker.errors import TopicError

PREFIX = "clue/v1"

TopicClass = Literal[
    "meta", "query", "kt", "fl", "batch", "labels", "config", "prediction", "events", "status", "reply", "other"
]
TOPIC_CLASSES: tuple[str, ...] = get_args(TopicClass)

#: Leaves of `node/{id}/…` topics and the byte class of each.
NODE_LEAVES: dict[str, TopicClass] = {
    "batch": "batch",
    "labels": "labels",
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
#: The node (and job) id rule as a regular expression; `.` and `..` are refused besides.
NODE_ID_PATTERN = f"^{_ID_RE.pattern}$"
_SHARE_RE = re.compile(r"^\$share/([^/#+]+)/(.+)$")
_REPLY_RE = re.compile(rf"{re.escape(PREFIX)}/(?:node|relay|app)/([^/]+)/reply")
MAX_TOPIC_LEN = 512

STATUS_ONLINE = b"online"
STATUS_OFFLINE = b"offline"


# --- ids -------------------------------------------------------------------------------------


def validate_node_id(node_id: str) -> str:
    """Return `node_id` if it is 1-64 of `[A-Za-z0-9_.-]` and not `.` or `..`, else raise `TopicError`."""
    if not isinstance(node_id, str) or not _ID_RE.fullmatch(node_id) or node_id in (".", ".."):
        raise TopicError(f"invalid node id {str(node_id)[:80]!r}: expected 1-64 of [A-Za-z0-9_.-], not '.' or '..'")
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


def node_labels(node_id: str) -> str:
    """Labels for batches one node served earlier (application -> agent, QoS 1)."""
    return _node(node_id, "labels")


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
    """Config patches for one node, and requests for its current config (operator -> agent; JSON or msgpack)."""
    return _node(node_id, "config")


def node_config_ack(node_id: str) -> str:
    """Config acknowledgements of one node, and its current config on request (agent -> operator)."""
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


def app_reply(app_id: str) -> str:
    """Replies to one application's requests: its predictions and label acknowledgements (agent -> application)."""
    return f"{PREFIX}/app/{validate_node_id(app_id)}/reply"


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
    if head == "app" and len(levels) == 3 and levels[2] == "reply":
        return "reply"
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
    """True for exactly `node/{id}/reply`, `relay/{id}/reply` or `app/{id}/reply` with a valid id: the only topics a
    request may name as `reply_to` (a responder answering anywhere else would publish on behalf of
    whoever wrote the request)."""
    m = _REPLY_RE.fullmatch(topic) if isinstance(topic, str) else None
    return m is not None and is_valid_node_id(m.group(1))


# --- what each topic carries -----------------------------------------------------------------

#: Largest config message (JSON or msgpack), whole: `broker.wire.DEFAULT_MAX_CONFIG_BYTES`.
MAX_CONFIG_BYTES = 64 << 10
#: Largest control message on a topic that carries only small ones (queries, requests, metadata):
#: the largest valid one is well under 100 KB.
MAX_CONTROL_BYTES = 1 << 20

TopicKind = Literal[
    "node/batch", "node/labels", "node/prediction", "node/meta", "node/status", "node/events", "node/config",
    "node/config/ack", "node/kt", "node/reply", "fleet/config", "mds/query", "relay/kt", "relay/reply",
    "fl/update", "fl/global", "app/reply",
]


@dataclass(frozen=True)
class TopicRule:
    """The default of one topic kind: `accepts`, the wire `type` names it carries (None: any);
    `max_bytes`, the largest message after chunk reassembly (None: the client's `max_blob_bytes`)."""

    accepts: tuple[str, ...] | None = None
    max_bytes: int | None = None


_REPLIES = ("mds.reply", "kt.blob", "error")

#: Topic kind -> default rule. Type names, not classes: `broker.wire` imports this module.
TOPIC_RULES: dict[str, TopicRule] = {
    "node/batch": TopicRule(("batch",)),
    "node/labels": TopicRule(("labels",), MAX_CONTROL_BYTES),
    "node/prediction": TopicRule(("prediction",)),
    "node/meta": TopicRule(("meta",), MAX_CONTROL_BYTES),
    "node/status": TopicRule(max_bytes=MAX_CONTROL_BYTES),  # raw `online` / `offline`
    "node/events": TopicRule(("event",)),
    "node/config": TopicRule(("config.patch", "config.request"), MAX_CONFIG_BYTES),
    "node/config/ack": TopicRule(("config.ack", "config.state"), MAX_CONTROL_BYTES),
    "node/kt": TopicRule(("kt.request",), MAX_CONTROL_BYTES),
    "node/reply": TopicRule(_REPLIES),
    "fleet/config": TopicRule(("config.patch",), MAX_CONFIG_BYTES),
    "mds/query": TopicRule(("mds.query",), MAX_CONTROL_BYTES),
    "relay/kt": TopicRule(("kt.request",), MAX_CONTROL_BYTES),
    "relay/reply": TopicRule(_REPLIES),
    "fl/update": TopicRule(("fl.update",)),
    "fl/global": TopicRule(("fl.global",)),
    "app/reply": TopicRule(("prediction", "labels.ack", "error")),
}
_ANY = TopicRule()


def topic_kind(topic: str) -> TopicKind | None:
    """The kind of a topic (a key of `TOPIC_RULES`), by its shape alone; None when not ours.

    The ids in it are not checked: a `node/{anything}/batch` topic is a batch topic, so an odd id
    can never make a topic accept more.

    >>> topic_kind("clue/v1/node/edge-1/config/ack"), topic_kind("clue/v1/fl/j/update/edge-1")
    ('node/config/ack', 'fl/update')
    """
    if not isinstance(topic, str):
        return None
    topic = strip_share(topic)
    if not topic.startswith(PREFIX + "/"):
        return None
    levels = topic[len(PREFIX) + 1:].split("/")
    head, rest = levels[0], levels[1:]
    if head == "node" and len(rest) >= 2 and "/".join(rest[1:]) in NODE_LEAVES:
        return f"node/{'/'.join(rest[1:])}"  # type: ignore[return-value]
    if head == "fleet" and rest == ["config"]:
        return "fleet/config"
    if head == "mds" and rest == ["query"]:
        return "mds/query"
    if head == "relay" and rest == ["kt"]:
        return "relay/kt"
    if head == "relay" and len(rest) == 2 and rest[1] == "reply":
        return "relay/reply"
    if head == "app" and len(rest) == 2 and rest[1] == "reply":
        return "app/reply"
    if head == "fl" and len(rest) == 3 and rest[1] == "update":
        return "fl/update"
    if head == "fl" and len(rest) == 2 and rest[1] == "global":
        return "fl/global"
    return None


def topic_rule(topic: str) -> TopicRule:
    """The default `TopicRule` of `topic` (any type, the client's size limit, when not ours).

    >>> topic_rule(node_batch("edge-1")).accepts, topic_rule(fleet_config()).max_bytes
    (('batch',), 65536)
    """
    kind = topic_kind(topic)
    return TOPIC_RULES[kind] if kind is not None else _ANY


__all__ = [
    "MAX_CONFIG_BYTES",
    "MAX_CONTROL_BYTES",
    "NODE_ID_PATTERN",
    "NODE_LEAVES",
    "PREFIX",
    "STATUS_OFFLINE",
    "STATUS_ONLINE",
    "TOPIC_CLASSES",
    "TOPIC_RULES",
    "TopicClass",
    "TopicKind",
    "TopicRule",
    "all_events",
    "all_meta",
    "all_node_topics",
    "all_predictions",
    "all_status",
    "app_reply",
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
    "node_labels",
    "node_meta",
    "node_prediction",
    "node_reply",
    "node_status",
    "parse_node_topic",
    "relay_kt",
    "relay_reply",
    "strip_share",
    "topic_class",
    "topic_kind",
    "topic_rule",
    "validate_filter",
    "validate_job_id",
    "validate_node_id",
    "validate_publish_topic",
]
