"""The client of an application that asks a node for predictions and sends it labels (`clue-app`).

An application publishes a `RequestBatch` on `node/{id}/batch` naming its own reply topic
(`app/{app_id}/reply`) and a correlation id; the node answers there with a `Prediction`. Labels
that come later go on `node/{id}/labels` as `Labels` (all of a batch's samples, or some by index);
asked to, the node acknowledges them with `LabelsAck`, or refuses them with an `ErrorReply` that
says why. The wire contract, for clients in other languages, is in `docs/applications.md`.

>>> # with AppClient.connect("mqtt://localhost:1883") as app:
>>> #     prediction = app.predict("edge-1", x)
>>> #     app.send_labels("edge-1", prediction.batch_id, y)
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from broker import topics
from broker.client import ErrorEvent, Inbound, MqttClient
from broker.ctl import (
    EXIT_REFUSED,
    EXIT_TIMEOUT,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    Refused,
    Unreachable,
    UsageError,
    _connection_options,
    client_settings,
    connect,
)
from broker.errors import BusError, RemoteError, RequestTimeout
from broker.wire import ArrayPayload, Envelope, ErrorReply, Labels, LabelsAck, Prediction, RequestBatch

#: The application identity of the fleet ACL files (`broker/topology.py`): its reply topic is `app/app/reply`.
DEFAULT_APP_ID = "app"


class AppClient:
    """Predictions and labels for one application, over an `MqttClient` it owns.

    ``app_id`` names the reply topic (`app/{app_id}/reply`); under the fleet ACL it must be the
    certificate's identity, `app`. Not thread-safe: one call at a time.
    """

    def __init__(self, client: MqttClient, app_id: str = DEFAULT_APP_ID, *, timeout: float = 10.0) -> None:
        self.client = client
        self.app_id = topics.validate_node_id(app_id)
        self.reply_topic = topics.app_reply(app_id)
        self.timeout = timeout
        # Unique across restarts of the application: milliseconds since the epoch, then a counter.
        self._ids = itertools.count(int(time.time() * 1000) << 12)

    @classmethod
    def connect(cls, broker: str = "mqtt://localhost:1883", app_id: str = DEFAULT_APP_ID, *, timeout: float = 10.0,
                **client_kwargs: Any) -> "AppClient":
        """Connect to ``broker`` (``client_kwargs``: `MqttClient` settings such as ``tls_ca``,
        ``tls_cert``, ``tls_key``) and subscribe to the reply topic."""
        client = MqttClient.from_url(broker, client_id=f"{app_id}-{uuid.uuid4().hex[:8]}", name=f"app {app_id}", **client_kwargs)
        client.subscribe(topics.app_reply(app_id), 1)
        client.start()
        if not client.wait_subscribed(timeout):
            client.stop()
            raise Unreachable(f"no connection to {broker} within {timeout:g} s")
        return cls(client, app_id, timeout=timeout)

    def close(self) -> None:
        self.client.stop()

    def __enter__(self) -> "AppClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def next_batch_id(self) -> int:
        return next(self._ids)

    def predict(self, node: str, x: np.ndarray, *, batch_id: int | None = None, y: np.ndarray | None = None,
                top_k: int | None = None, timeout: float | None = None) -> Prediction:
        """Ask ``node`` to predict the samples ``x`` (first axis = samples); its `Prediction`.

        ``y``: labels sent with the batch; without them, send them later with ``send_labels`` and
        the prediction's ``batch_id``. Raises RequestTimeout, or RemoteError when the node refuses
        the batch (its reason in the message).
        """
        batch_id = self.next_batch_id() if batch_id is None else batch_id
        corr = uuid.uuid4().hex
        msg = RequestBatch(
            batch_id=batch_id, x=ArrayPayload.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
            y=ArrayPayload.from_numpy(smallest_int_array(y)) if y is not None else None, top_k=top_k, reply_to=self.reply_topic, corr=corr,
        )
        reply = self._ask(topics.node_batch(node), msg, corr, timeout)
        if not isinstance(reply, Prediction):
            raise BusError(f"{node} answered a batch with a {reply.type!r} message")
        return reply

    def send_labels(self, node: str, batch_id: int, y: np.ndarray, indices: np.ndarray | None = None, *,
                    wait: bool = True, timeout: float | None = None) -> LabelsAck | None:
        """Label samples of a batch ``node`` served: all of them in order, or those ``indices`` names.

        ``wait``: ask for the node's acknowledgement and return it (RemoteError when it refuses the
        labels, with why); otherwise send and return None.
        """
        corr = uuid.uuid4().hex if wait else None
        msg = Labels(
            batch_id=batch_id, y=ArrayPayload.from_numpy(smallest_int_array(y)),
            indices=ArrayPayload.from_numpy(smallest_int_array(indices)) if indices is not None else None,
            reply_to=self.reply_topic if wait else None, corr=corr,
        )
        if corr is None:
            self.client.publish_message(topics.node_labels(node), msg, 1)
            return None
        reply = self._ask(topics.node_labels(node), msg, corr, timeout)
        if not isinstance(reply, LabelsAck):
            raise BusError(f"{node} answered labels with a {reply.type!r} message")
        return reply

    def _ask(self, topic: str, msg: Envelope, corr: str, timeout: float | None) -> Envelope:
        self.client.publish_message(topic, msg, 1)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while (left := deadline - time.monotonic()) > 0:
            item = self.client.get(timeout=left)
            if isinstance(item, ErrorEvent):
                if item.context in ("connection", "subscribe"):
                    raise BusError(f"{item.context}: {item.error}")
                continue
            if not isinstance(item, Inbound) or item.topic != self.reply_topic or getattr(item.message, "corr", None) != corr:
                continue  # an answer to an earlier call that timed out
            if isinstance(item.message, ErrorReply):
                raise RemoteError(item.message)
            assert item.message is not None
            return item.message
        raise RequestTimeout(f"no answer on {self.reply_topic} to {msg.type} {corr} within {self.timeout if timeout is None else timeout:g} s")


def smallest_int_array(values: np.ndarray | Sequence[int] | None) -> np.ndarray:
    """Integer labels or indices in the smallest dtype that holds them: a 200-sample batch's labels take 200 bytes."""
    arr = np.asarray(values)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"labels and indices must be a 1-d integer array, got {arr.dtype} {arr.shape}")
    if arr.size == 0:
        return arr.astype(np.uint8)
    for dtype in (np.uint8, np.uint16, np.int32, np.int64):
        info = np.iinfo(dtype)
        if arr.min() >= info.min and arr.max() <= info.max:
            return arr.astype(np.int16 if dtype is np.uint16 else dtype)  # the wire has no uint16
    return arr.astype(np.int64)


# --- command line --------------------------------------------------------------------------------


def load_array(path: str, key: str) -> np.ndarray:
    """An array from `.npy`, from `.npz` (array ``key``), or from JSON (a nested list, or an object's ``key``)."""
    p = Path(path)
    try:
        if p.suffix == ".npy":
            return np.load(p, allow_pickle=False)
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as npz:
                if key not in npz.files:
                    raise UsageError(f"{path} has no array {key!r} (it has {', '.join(npz.files) or 'none'})")
                return npz[key]
        data = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: {exc}") from exc
    if isinstance(data, dict):
        if key not in data:
            raise UsageError(f"{path} has no key {key!r}")
        data = data[key]
    try:
        return np.asarray(data, dtype=np.float64 if key == "x" else np.int64)
    except (ValueError, TypeError, OverflowError) as exc:
        raise UsageError(f"{path}: {key} is not a rectangular array of numbers ({exc})") from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clue-app", add_help=False,
                                     description="Ask a CLUE Edge node for predictions and send it labels, as an application does.")
    _connection_options(parser, suppress=False)
    parser.add_argument("--app-id", default=DEFAULT_APP_ID, help="names the reply topic app/ID/reply (the fleet ACL's identity: app)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the node's answer (default 10)")
    commands = parser.add_subparsers(dest="command", required=True)
    predict = commands.add_parser("predict", help="send a batch and print its prediction")
    predict.add_argument("node")
    predict.add_argument("inputs", help=".npy, .npz (array x) or JSON (a nested list, or an object with x)")
    predict.add_argument("--labels", help="labels sent with the batch (.npy, .npz array y, or JSON)")
    predict.add_argument("--batch-id", type=int, help="the batch's id (default: a fresh one)")
    predict.add_argument("--top-k", type=int, help="each sample's k most probable classes with their probabilities")
    labels = commands.add_parser("labels", help="label samples of a batch the node served")
    labels.add_argument("node")
    labels.add_argument("batch_id", type=int)
    labels.add_argument("labels", help=".npy, .npz (array y) or JSON (a list, or an object with y)")
    labels.add_argument("--indices", help="the samples they label (.npy, .npz array indices, or JSON); default: all, in order")
    labels.add_argument("--no-wait", action="store_true", help="send without asking for an acknowledgement")
    return parser


def _print_prediction(p: Prediction, out: TextIO) -> None:
    doc: dict[str, Any] = {"batch_id": p.batch_id, "y_hat": p.y_hat.to_numpy().tolist(), "model_version": p.model_version,
                           "helpers": p.helpers}
    if p.error is not None:
        doc["error"] = p.error
    if p.top_classes is not None and p.top_probs is not None:
        doc["top_classes"] = p.top_classes.to_numpy().tolist()
        doc["top_probs"] = np.round(p.top_probs.to_numpy().astype(np.float64), 6).tolist()
    print(json.dumps(doc), file=out)


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run ``clue-app``; returns its exit code as ``clue-ctl``'s (0; 1 refused by the node; 2 usage; 3 no answer; 4 unreachable)."""
    out, err = out or sys.stdout, err or sys.stderr
    args = build_parser().parse_args(argv)
    try:
        if args.command == "predict":
            x = load_array(args.inputs, "x")
            y = load_array(args.labels, "y") if args.labels else None
        else:
            y = load_array(args.labels, "y")
            indices = load_array(args.indices, "indices") if args.indices else None
        settings = client_settings(args)
        settings.update(client_id=f"{args.app_id}-{uuid.uuid4().hex[:8]}", name="clue-app")
        client = connect(settings, [topics.app_reply(args.app_id)], args.connect_timeout)
    except UsageError as exc:
        print(f"clue-app: {exc}", file=err)
        return EXIT_USAGE
    except (Unreachable, Refused) as exc:
        print(f"clue-app: {exc}", file=err)
        return EXIT_UNREACHABLE
    app = AppClient(client, args.app_id, timeout=args.timeout)
    try:
        if args.command == "predict":
            _print_prediction(app.predict(args.node, x, batch_id=args.batch_id, y=y, top_k=args.top_k), out)
        else:
            ack = app.send_labels(args.node, args.batch_id, y, indices, wait=not args.no_wait)
            if ack is not None:
                print(json.dumps({"batch_id": ack.batch_id, "learnt": ack.learnt, "error": ack.error, "pending": ack.pending}), file=out)
        return 0
    except RemoteError as exc:
        print(f"clue-app: {args.node} refused it: {exc}", file=err)
        return EXIT_REFUSED
    except RequestTimeout as exc:
        print(f"clue-app: {exc}", file=err)
        return EXIT_TIMEOUT
    except (ValueError, BusError) as exc:
        print(f"clue-app: {exc}", file=err)
        return EXIT_USAGE
    finally:
        app.close()


if __name__ == "__main__":
    sys.exit(main())
