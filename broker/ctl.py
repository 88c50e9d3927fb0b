"""``clue-ctl``: the operator's command line over MQTT — fleet status, config patches, events.

    clue-ctl status
    clue-ctl set z=0.3 --node edge-1
    clue-ctl set drift.window=5 'operator={"type": "mean"}' --fleet
    clue-ctl watch --count 20
    clue-ctl config edge-1
    clue-ctl top
    clue-ctl --broker mqtts://broker.lan:8883 --cafile ca.crt --cert operator.crt --key operator.key status

``status`` reads the retained ``meta`` and ``status`` of every node. ``set`` publishes one
``ConfigPatch`` (values parsed as JSON where they parse, else taken as strings) and waits for the
``ConfigAck`` of each node, matched by the patch's ``msg_id``; with ``--fleet`` the nodes are
those whose retained status says ``online``. ``watch`` prints events, one line each. ``config``
asks one node for its current configuration (a ``ConfigRequest`` on its config topic, answered by
a ``ConfigState`` on its ack topic): the run-time knobs, marked ``*`` where a run-time patch set
them, and the settings it started with (never a password). ``top`` is a live table of the fleet
from retained status and metadata, predictions and events (`broker.fleet_view`), redrawn in
place every ``--interval`` s until Ctrl-C or ``--count`` frames; printed to a file or pipe, each
frame follows the one before.

Connection options mirror ``mosquitto_pub``'s (``-h``, ``-p``, ``--cafile``, ``--cert``, ``--key``,
``-u``, ``-i``), before or after the command, and ``--broker URL`` names host, port and TLS at once
(``-h``/``-p`` then override it). A password is read from ``--pw-file`` only: one given on the
command line would be visible to every user of the machine through ``ps``, so ``-P`` is refused.

Exit codes: 0 done; 1 a node refused the patch; 2 bad usage; 3 a node did not answer in time (or
none was online, or ``status`` saw no node at all); 4 the broker could not be reached, or refused
the connection or a subscription the command needs.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
import uuid
from typing import Any, Sequence, TextIO

from pydantic import ValidationError

from broker import topics
from broker.client import ClientSettings, ErrorEvent, Inbound, MqttClient, iter_inbox, parse_broker_url
from broker.errors import BusError
from broker.fleet_view import FleetView
from broker.wire import ConfigAck, ConfigPatch, ConfigRequest, ConfigState, Event, NodeMeta

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3
EXIT_UNREACHABLE = 4

#: Retained messages follow the SUBACK at once; this long without one means all have arrived.
RETAINED_QUIET_S = 0.3
#: Every node's config acks (``broker.topics`` has no wildcard helper for them).
ALL_CONFIG_ACKS = f"{topics.PREFIX}/node/+/config/ack"
#: Why nothing may arrive although nodes did publish: Mosquitto 2.0 grants a subscription its ACL
#: file denies and then delivers nothing, so an identity that may not read looks like an empty fleet.
UNREADABLE = ("Mosquitto grants a subscription its ACL denies and delivers nothing; "
              "under the fleet ACL only the operator's certificate reads the fleet")


class UsageError(Exception):
    """A command line that cannot be carried out (exit 2)."""


class Unreachable(Exception):
    """The broker could not be reached, or refused the connection (exit 4)."""


class Refused(Unreachable):
    """The broker refused a subscription the command needs (exit 4): it would wait for nothing."""


# --- the command line ----------------------------------------------------------------------------


def _connection_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    # Given twice (before and after the command); SUPPRESS keeps the subcommand's copy from
    # overwriting a value given before the command with its default.
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    group = parser.add_argument_group("connection (as mosquitto_pub)")
    group.add_argument("--broker", default=default(None), help="mqtt://host:port, mqtts://host:port or unix:///path")
    group.add_argument("-h", "--host", default=default(None), help="broker host (default localhost)")
    group.add_argument("-p", "--port", type=int, default=default(None), help="broker port (default 1883, 8883 with TLS)")
    group.add_argument("--cafile", default=default(None), help="CA certificate: turns TLS on")
    group.add_argument("--cert", default=default(None), help="client certificate (CN operator under the fleet ACL)")
    group.add_argument("--key", default=default(None), help="client key")
    group.add_argument("-u", "--username", default=default(None), help="MQTT username")
    group.add_argument("--pw-file", default=default(None), help="file holding the MQTT password")
    group.add_argument("-P", "--pw", dest="pw", default=default(None), help=argparse.SUPPRESS)
    group.add_argument("-i", "--id", dest="client_id", default=default(None), help="MQTT client id (default clue-ctl:<pid>:<random>)")
    group.add_argument("--connect-timeout", type=float, default=default(5.0), help="seconds to reach the broker (default 5)")
    group.add_argument("--help", action="help", help="show this help and exit")


def build_parser() -> argparse.ArgumentParser:
    """The ``clue-ctl`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="clue-ctl", add_help=False,
        description="Operate a CLUE Edge fleet over MQTT: status, config patches, events.",
        epilog="Exit codes: 0 done, 1 refused, 2 usage, 3 no answer in time, 4 broker unreachable.",
    )
    _connection_options(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    status = commands.add_parser("status", add_help=False, help="the fleet from retained meta and status")
    status.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    _connection_options(status, suppress=True)

    patch = commands.add_parser("set", add_help=False, help="publish a config patch and wait for the acks")
    patch.add_argument("assignments", nargs="+", metavar="KEY=VALUE", help='e.g. z=0.3 drift.window=5 \'operator={"type": "mean"}\'')
    target = patch.add_mutually_exclusive_group(required=True)
    target.add_argument("--node", action="append", metavar="ID", help="this node (repeatable)")
    target.add_argument("--fleet", action="store_true", help="every agent; waits for each node online in retained status")
    patch.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the acks (default 10)")
    patch.add_argument("--retain", action="store_true", help="keep the patch on the broker: nodes that start later apply it too")
    _connection_options(patch, suppress=True)

    watch = commands.add_parser("watch", add_help=False, help="print events as they come, one line each")
    watch.add_argument("--node", action="append", metavar="ID", help="only this node (repeatable)")
    watch.add_argument("--kind", action="append", metavar="KIND", help="only this kind of event (repeatable): drift, helper_installed, …")
    watch.add_argument("--count", type=int, metavar="N", help="stop after N events")
    watch.add_argument("--json", action="store_true", help="one JSON object per line")
    _connection_options(watch, suppress=True)

    config = commands.add_parser("config", add_help=False, help="print a node's current configuration")
    config.add_argument("node", metavar="NODE", help="the node's id")
    config.add_argument("--json", action="store_true", help="the node's answer as one JSON document")
    config.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the answer (default 10)")
    _connection_options(config, suppress=True)

    top = commands.add_parser("top", add_help=False, help="a live table of the fleet, refreshed in place")
    top.add_argument("--interval", type=float, default=2.0, help="seconds between two refreshes (default 2)")
    top.add_argument("--count", type=int, metavar="N", help="stop after N refreshes (default: until Ctrl-C)")
    _connection_options(top, suppress=True)
    return parser


def parse_assignment(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` → ``(KEY, value)``: VALUE as JSON if it parses (``0.3``, ``5``, ``true``,
    ``{"type": "mean"}``), else the string itself (``relay``).

    >>> parse_assignment('operator={"type": "mean"}')
    ('operator', {'type': 'mean'})
    >>> parse_assignment("kt_mode=relay")
    ('kt_mode', 'relay')
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UsageError(f"{text!r} is not KEY=VALUE")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key, value


def client_settings(args: argparse.Namespace) -> dict[str, Any]:
    """``MqttClient`` keyword arguments from the connection options."""
    if args.pw is not None:
        raise UsageError("-P is not accepted: a password on the command line is visible to every user through ps; use --pw-file FILE")
    if args.pw_file is not None and args.username is None:
        raise UsageError("--pw-file needs -u USERNAME")
    if args.broker is not None:
        try:
            settings = parse_broker_url(args.broker)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    else:
        settings = {"host": "localhost"}
    tls = settings.pop("tls", False) or any(x is not None for x in (args.cafile, args.cert, args.key))
    if args.host is not None:
        settings.pop("unix_socket", None)
        settings["host"] = args.host
    if args.port is not None:
        settings["port"] = args.port
    elif "unix_socket" not in settings and "port" not in settings:
        settings["port"] = 8883 if tls else 1883
    for option in ("cafile", "cert", "key", "pw_file"):
        path = getattr(args, option)
        if path is not None and not os.access(path, os.R_OK):
            raise UsageError(f"--{option.replace('_', '-')} {path}: not a readable file")
    # Not a valid node id (the colons), so the client subscribes to no node's reply topic.
    client_id = args.client_id or f"clue-ctl:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    return {
        **settings, "client_id": client_id, "tls": tls, "tls_ca": args.cafile, "tls_cert": args.cert,
        "tls_key": args.key, "username": args.username, "password_file": args.pw_file,
        # A clean session that the broker drops 1 s after we exit (MqttClient refuses 0): a longer
        # one would queue the fleet's events and acks for a client that is gone.
        "session_expiry": 1, "clean_start": True, "name": "clue-ctl", "reconnect_max_delay": 2.0,
    }


# --- talking to the broker -----------------------------------------------------------------------


def connect(settings: dict[str, Any], filters: Sequence[str], timeout: float) -> MqttClient:
    """A started client, connected and subscribed to ``filters``; Unreachable (or Refused) otherwise."""
    try:
        client = MqttClient(ClientSettings(**settings))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    for topic_filter in filters:
        client.subscribe(topic_filter, 1)
    try:
        client.start()
    except (OSError, ValueError) as exc:  # TLS files the ssl module cannot load
        client.stop()
        raise Unreachable(f"cannot set up the connection: {exc}") from exc
    if not client.wait_subscribed(timeout):
        refusal = client.last_refusal
        client.stop()
        where = settings.get("unix_socket") or f"{settings.get('host')}:{settings.get('port')}"
        raise Unreachable(f"the broker refused the connection: {refusal}" if refusal else f"no connection to {where} within {timeout:g} s")
    if client.stats()["subscribe_refused"]:
        # The SUBACK said no; its ErrorEvent follows, perhaps after retained messages of the rest.
        refusal = next((i for i in iter_inbox(client, 1.0) if isinstance(i, ErrorEvent) and i.context == "subscribe"), None)
        client.stop()
        raise Refused(f"the broker refused our subscription to {', '.join(filters)} ({refusal.error if refusal else 'refused in the SUBACK'}): "
                      "this identity may not read them; under the fleet ACL, connect with the operator's certificate")
    return client


def _client_error(item: ErrorEvent, err: TextIO) -> None:
    """Warn of a client error; a subscription refused (on a reconnect) ends the command."""
    if item.context == "subscribe":
        raise Refused(f"the broker refused a subscription on reconnecting ({item.error})")
    print(f"clue-ctl: warning: {item.context} error on {item.topic or 'the connection'}: {item.error}", file=err)


def read_retained(client: MqttClient, *, quiet: float = RETAINED_QUIET_S, limit: float = 5.0, err: TextIO = sys.stderr) -> list[Inbound]:
    """The retained messages that follow a subscription: everything until ``quiet`` s pass without one."""
    got: list[Inbound] = []
    deadline = time.monotonic() + limit
    while (left := deadline - time.monotonic()) > 0:
        item = client.get(timeout=min(quiet, left))
        if item is None:
            break
        if isinstance(item, ErrorEvent):
            _client_error(item, err)
        elif item.retained:
            got.append(item)
    return got


@dataclasses.dataclass
class NodeRow:
    """One line of ``clue-ctl status``."""

    node: str
    status: str = "unknown"
    arch_id: str | None = None
    lineage: str | None = None
    rolling_error: float | None = None
    helpers: int | None = None
    batches: int | None = None
    meta_age_s: float | None = None


def fleet_rows(items: Sequence[Inbound], now: float | None = None) -> list[NodeRow]:
    """Rows by node id from retained ``status`` and ``meta`` messages."""
    now = time.time() if now is None else now
    rows: dict[str, NodeRow] = {}
    for item in items:
        try:
            node, leaf = topics.parse_node_topic(item.topic)
        except BusError:
            continue
        row = rows.setdefault(node, NodeRow(node))
        if leaf == "status" and item.payload:
            row.status = item.payload.decode("utf-8", "replace")
        elif leaf == "meta" and isinstance(item.message, NodeMeta):
            meta = item.message
            row.arch_id, row.lineage, row.rolling_error = meta.arch_id, meta.lineage, meta.rolling_error
            row.helpers, row.batches, row.meta_age_s = meta.helpers, meta.batches, max(0.0, now - meta.ts)
    return [rows[n] for n in sorted(rows)]


def _cell(value: Any, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def format_table(rows: Sequence[NodeRow]) -> str:
    """The fleet as an aligned text table."""
    header = ("NODE", "STATUS", "ARCH", "LINEAGE", "ERROR", "HELPERS", "BATCHES", "META AGE")
    lines = [header] + [
        (r.node, r.status, _cell(r.arch_id), _cell(r.lineage), _cell(r.rolling_error, "{:.3f}"),
         _cell(r.helpers), _cell(r.batches), _cell(r.meta_age_s, "{:.0f} s"))
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def _lookup(applied: dict[str, Any] | None, key: str) -> Any:
    value: Any = applied or {}
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


# --- commands ------------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    client = connect(client_settings(args), [topics.all_status(), topics.all_meta()], args.connect_timeout)
    try:
        rows = fleet_rows(read_retained(client, err=err))
    finally:
        client.stop()
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows], indent=2), file=out)
    elif rows:
        print(format_table(rows), file=out)
    if not rows:
        print(f"no node's status or metadata arrived: none has published on this broker, or this identity may not read them ({UNREADABLE})", file=err)
    return EXIT_OK if rows else EXIT_TIMEOUT


def cmd_set(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    values = dict(parse_assignment(a) for a in args.assignments)
    try:
        patch = ConfigPatch(values=values)
        nodes = [topics.validate_node_id(n) for n in args.node or ()]
    except (ValidationError, BusError) as exc:
        raise UsageError(f"not a valid patch: {exc}") from exc
    if args.fleet:
        filters = [ALL_CONFIG_ACKS, topics.all_status()]
    else:
        filters = [topics.node_config_ack(n) for n in nodes]
    client = connect(client_settings(args), filters, args.connect_timeout)
    try:
        if args.fleet:
            online = {r.node for r in fleet_rows(read_retained(client, err=err)) if r.status == topics.STATUS_ONLINE.decode()}
            expected = sorted(online)
            client.publish_message(topics.fleet_config(), patch, 1, args.retain).wait(args.timeout)
        else:
            expected = nodes
            for node in nodes:
                client.publish_message(topics.node_config(node), patch, 1, args.retain).wait(args.timeout)
        acks = _wait_acks(client, patch.msg_id, set(expected), args.timeout, fleet=args.fleet, err=err)
    finally:
        client.stop()
    return _report(values, expected, acks, args, out)


def _wait_acks(client: MqttClient, patch_id: str, expected: set[str], timeout: float, *, fleet: bool, err: TextIO) -> dict[str, ConfigAck]:
    acks: dict[str, ConfigAck] = {}
    deadline = time.monotonic() + timeout
    # With --fleet, a node that comes online meanwhile answers too; wait for the expected ones.
    while not expected <= set(acks) and (left := deadline - time.monotonic()) > 0:
        item = client.get(timeout=left)
        if isinstance(item, ErrorEvent):
            _client_error(item, err)
        elif item is not None and isinstance(item.message, ConfigAck) and item.message.patch_id == patch_id:
            acks[item.message.node_id] = item.message
    return acks


def _report(values: dict[str, Any], expected: list[str], acks: dict[str, ConfigAck], args: argparse.Namespace, out: TextIO) -> int:
    if not expected and not acks:
        print(f"no node is online (retained status), or this identity may not read it ({UNREADABLE}); "
              "the patch was published" + (" and retained" if args.retain else ""), file=out)
        return EXIT_TIMEOUT
    refused = missing = 0
    for node in sorted(set(expected) | set(acks)):
        ack = acks.get(node)
        if ack is None:
            missing += 1
            print(f"{node}: no answer within {args.timeout:g} s", file=out)
        elif ack.ok:
            shown = " ".join(f"{k}={json.dumps(_lookup(ack.applied, k))}" for k in values)
            print(f"{node}: applied {shown}", file=out)
        else:
            refused += 1
            print(f"{node}: refused: {ack.error}", file=out)
    if refused:
        return EXIT_REFUSED
    return EXIT_TIMEOUT if missing else EXIT_OK


def format_event(event: Event) -> str:
    """One line: local time, node, kind, then ``key=value`` pairs (JSON values)."""
    when = datetime.datetime.fromtimestamp(event.sent_at).isoformat(timespec="milliseconds")
    detail = " ".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in event.detail.items())
    return f"{when} {event.node_id} {event.kind}" + (f" {detail}" if detail else "")


def cmd_watch(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if args.count is not None and args.count < 1:
        raise UsageError("--count must be at least 1")
    try:
        filters = [topics.node_events(n) for n in args.node] if args.node else [topics.all_events()]
    except BusError as exc:
        raise UsageError(str(exc)) from exc
    client = connect(client_settings(args), filters, args.connect_timeout)
    print(f"clue-ctl: watching {', '.join(filters)}", file=err, flush=True)
    seen = 0
    try:
        while args.count is None or seen < args.count:
            item = client.get(timeout=1.0)
            if isinstance(item, ErrorEvent):
                _client_error(item, err)
                continue
            if item is None or not isinstance(item.message, Event):
                continue
            event = item.message
            if args.kind and event.kind not in args.kind:
                continue
            line = json.dumps(event.model_dump(mode="json")) if args.json else format_event(event)
            print(line, file=out, flush=True)
            seen += 1
    except KeyboardInterrupt:
        pass
    finally:
        client.stop()
    return EXIT_OK


def format_config(state: ConfigState) -> str:
    """A node's configuration, one ``key = value`` a line (JSON values), knobs then settings."""
    lines = [f"{state.node_id}: run-time knobs (* set by a run-time patch; clue-ctl set changes them)"]
    patched = set(state.patched)
    for key in sorted(state.values):
        mark = "*" if key in patched or any(p.startswith(key + ".") for p in patched) else " "
        lines.append(f" {mark} {key} = {json.dumps(state.values[key], separators=(', ', ': '))}")
    lines.append(f"{state.node_id}: settings it started with (file, CLUE_* variables, flags)")
    for key in sorted(state.settings):
        lines.append(f"   {key} = {json.dumps(state.settings[key])}")
    return "\n".join(lines)


def cmd_config(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        node = topics.validate_node_id(args.node)
    except BusError as exc:
        raise UsageError(str(exc)) from exc
    request = ConfigRequest()
    client = connect(client_settings(args), [topics.node_config_ack(node)], args.connect_timeout)
    try:
        client.publish_message(topics.node_config(node), request, 1).wait(args.timeout)
        state = None
        deadline = time.monotonic() + args.timeout
        while state is None and (left := deadline - time.monotonic()) > 0:
            item = client.get(timeout=left)
            if isinstance(item, ErrorEvent):
                _client_error(item, err)
            elif item is not None and isinstance(item.message, ConfigState) and item.message.request_id == request.msg_id:
                state = item.message
    finally:
        client.stop()
    if state is None:
        print(f"clue-ctl: {node} did not answer within {args.timeout:g} s: it is offline, runs an agent older than this "
              f"command, or this identity may not write its config topic or read its ack topic ({UNREADABLE})", file=err)
        return EXIT_TIMEOUT
    print(json.dumps(state.model_dump(mode="json"), indent=2) if args.json else format_config(state), file=out)
    return EXIT_OK


def cmd_top(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from rich.console import Console
    from rich.live import Live

    if args.count is not None and args.count < 1:
        raise UsageError("--count must be at least 1")
    if args.interval <= 0:
        raise UsageError("--interval must be above 0")
    filters = [topics.all_status(), topics.all_meta(), topics.all_predictions(), topics.all_events()]
    client = connect(client_settings(args), filters, args.connect_timeout)
    view = FleetView()
    console = Console(file=out)
    frames = 0

    def frame() -> Any:
        when = datetime.datetime.now().isoformat(timespec="seconds")
        return view.table(title=f"clue-ctl top  {when}  every {args.interval:g} s  (Ctrl-C quits)")

    try:
        # Off a terminal, rich prints nothing until the end: print each frame after the last instead.
        with Live(frame(), console=console, auto_refresh=False, redirect_stdout=False, redirect_stderr=False) if console.is_terminal else _Frames(console) as live:
            next_frame = time.monotonic() + args.interval
            while args.count is None or frames < args.count:
                item = client.get(timeout=max(0.0, next_frame - time.monotonic()))
                if isinstance(item, ErrorEvent):
                    _client_error(item, err)
                elif item is not None:
                    view.add(item)
                if time.monotonic() >= next_frame:
                    live.update(frame(), refresh=True)
                    frames += 1
                    next_frame += args.interval
    except KeyboardInterrupt:
        pass
    finally:
        client.stop()
    return EXIT_OK


class _Frames:
    """`rich.live.Live`'s `update` for a console that is no terminal: each frame printed after the last."""

    def __init__(self, console: Any) -> None:
        self.console = console

    def __enter__(self) -> "_Frames":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, renderable: Any, *, refresh: bool = False) -> None:
        self.console.print(renderable)
        self.console.print()


COMMANDS = {"status": cmd_status, "set": cmd_set, "watch": cmd_watch, "config": cmd_config, "top": cmd_top}


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run ``clue-ctl``; returns its exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args, out, err)
    except UsageError as exc:
        print(f"clue-ctl: {exc}", file=err)
        return EXIT_USAGE
    except Unreachable as exc:
        print(f"clue-ctl: {exc}", file=err)
        return EXIT_UNREACHABLE


if __name__ == "__main__":
    sys.exit(main())
