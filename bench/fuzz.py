"""Coverage-guided fuzzing (atheris / libFuzzer) of every decoder of untrusted bytes.

Targets, each in a child process of its own (libFuzzer owns the process and exits when done):

- ``wire``: ``broker.wire.decode`` — any MQTT payload an agent, the MdS or the relay receives;
- ``config``: ``broker.wire.decode_config`` — config topics (msgpack, JSON envelope, bare JSON);
- ``blob``: ``agent.kt.codec.decode_blob`` on the raw bytes of a KT reply (zstd frame first);
- ``blob_doc``: the same decoder behind a valid zstd frame, so mutations reach the msgpack and
  tensor checks instead of dying on the frame checksum;
- ``app``: ``broker.wire.decode_app`` — what applications send on batch and labels topics
  (msgpack, JSON envelope, bare JSON with arrays as nested lists), then the JSON answer's encoder;
- ``chunks``: ``decode(expect=BlobChunk)`` then ``ChunkAssembler.add`` over a sequence of chunks;
- ``topics``: ``broker.topics`` parsers and matchers on arbitrary text.

A decoder may only raise the project's typed errors (``WireError``, ``TopicError``,
``KtRejected``); anything else is a crash. Crashes are caught, counted and their inputs kept
under ``bench/results/fuzz-crashes/`` (so one run finds more than the first), and
``bench/results/fuzz.json`` gets the inputs run and crashes per target.

    .venv/bin/python -m bench.fuzz --inputs 1000000 --max-seconds 1200
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CRASH_DIR = RESULTS / "fuzz-crashes"
TARGETS = ("wire", "config", "app", "blob", "blob_doc", "chunks", "topics")
#: Longest input tried: larger than every seed, small enough to keep thousands of runs a second.
MAX_LEN = 16384


# --- the harnesses (run in the child) -------------------------------------------------------


def _model() -> dict:
    """A small local model for the blob decoder: shapes, base weights, ids (like tests/test_codec.py)."""
    import torch

    shapes = {"fc1.weight": (12, 6), "fc1.bias": (12,), "fc2.weight": (4, 12), "fc2.bias": (4,), "temp": ()}
    g = torch.Generator().manual_seed(0)
    base = {name: torch.randn(shape, generator=g) * 0.05 for name, shape in shapes.items()}
    return {"arch_id": "fuzz-arch", "lineage": "fuzz-lineage", "shapes": shapes, "num_classes": 4, "base": base}


def _blob_seeds(model: dict) -> list[bytes]:
    import torch

    from agent.kt.codec import encode_blob
    from agent.kt.significant import SignificantParams, TensorSlice

    seeds = []
    for codec in ("float32", "float16", "int8", "int4_delta"):
        for z, delta in ((0.1, False), (0.6, True)):
            if codec == "int4_delta" and not delta:
                continue  # it only exists as deltas from the base
            g = torch.Generator().manual_seed(int(z * 10))
            slices = []
            for name, shape in model["shapes"].items():
                flat = (model["base"][name] + 0.01).reshape(-1)
                idx = torch.nonzero(torch.rand(flat.numel(), generator=g) < z).reshape(-1)
                slices.append(TensorSlice(name, shape, idx, flat[idx].clone()))
            sig = SignificantParams(model["arch_id"], model["lineage"], (1, 3), z, tuple(slices))
            seeds.append(encode_blob(sig, value_codec=codec, base=model["base"] if delta else None))
    return seeds


def _app_seeds() -> list[bytes]:
    import numpy as np

    from broker.wire import ArrayPayload, Labels, encode

    labels = Labels(batch_id=7, y=ArrayPayload.from_numpy(np.array([1, 0], dtype=np.uint8)),
                    indices=ArrayPayload.from_numpy(np.array([3, 1], dtype=np.int16)), reply_to="clue/v1/app/app/reply", corr="c1")
    return [
        encode(labels),
        b'{"batch_id": 41, "x": [[0.1, 0.2], [0.3, 0.4]], "top_k": 2, "reply_to": "clue/v1/app/app/reply", "corr": "b41"}',
        b'{"batch_id": 41, "x": [[1, 2]], "y": [1], "y_indices": [0]}',
        b'{"batch_id": 41, "y": [1, 0], "indices": [2, 0]}',
        b'{"v": 1, "type": "labels", "batch_id": 3, "y": [[1]]}',
    ]


def _wire_seeds() -> list[bytes]:
    import numpy as np

    from broker.chunking import encode_chunks
    from broker.wire import (
        ArrayPayload,
        Candidate,
        ConfigAck,
        ConfigPatch,
        ErrorReply,
        Event,
        GlobalModel,
        HelperList,
        HelpQuery,
        KtBlob,
        KtRequest,
        ModelUpdate,
        NamedArray,
        NodeMeta,
        Prediction,
        RequestBatch,
        encode,
        encode_json,
    )

    arr = ArrayPayload.from_numpy(np.arange(6, dtype=np.float32).reshape(2, 3))
    msgs = [
        RequestBatch(batch_id=3, x=arr, y=ArrayPayload.from_numpy(np.array([1, 2], dtype=np.int64)), meta={"k": 1}),
        Prediction(batch_id=3, y_hat=ArrayPayload.from_numpy(np.array([1, 0], dtype=np.int64)), helpers=["h"], error=0.5),
        NodeMeta(node_id="n1", arch_id="mlp", lineage="b0", hist=[1.0, 2.0], rolling_error=0.1),
        Event(node_id="n1", kind="drift", detail={"classes": [8, 9], "x": None}),
        ConfigPatch(values={"z": 0.3, "drift": {"window": 4}, "l": [1, 2]}),
        ConfigAck(node_id="n1", ok=False, error="bad"),
        ErrorReply(corr="c1", code="rejected", message="no"),
        HelperList(corr="c1", candidates=[Candidate(node_id="h1", score=0.5, classes=[8])]),
        KtBlob(corr="c1", blob=b"\x28\xb5\x2f\xfd" + b"x" * 40, helper="h1"),
        HelpQuery(node_id="n1", arch_id="mlp", lineage="b0", classes=[8], hist=[1.0], reply_to="clue/v1/node/n1/reply", corr="c1"),
        KtRequest(classes=[8, 9], z=0.3, arch_id="mlp", lineage="b0", corr="c2"),
        ModelUpdate(job="j", round=1, samples=4, node_id="n1", tensors=[NamedArray(name="w", array=arr)]),
        GlobalModel(job="j", round=1, samples=4, tensors=[NamedArray(name="w", array=arr)]),
    ]
    seeds = [encode(m) for m in msgs]
    seeds += [encode_json(msgs[4]), b'{"z": 0.3, "drift.window": 4}', b'{"v": 1, "type": "config.patch", "values": {}}']
    seeds += encode_chunks(b"payload " * 100, chunk_bytes=1024)
    return seeds


def _harness(target: str):
    """The one-input function of ``target`` and its seed inputs."""
    import atheris

    with atheris.instrument_imports(include=["broker", "agent"]):
        from agent.errors import KtRejected
        from agent.kt import codec
        from broker import chunking, topics, wire
        from broker.errors import TopicError, WireError

    if target == "wire":
        def one(data: bytes) -> None:
            for kwargs in ({}, {"expect": (wire.HelpQuery, wire.KtRequest), "max_bytes": 4096}):
                try:
                    msg = wire.decode(data, **kwargs)
                except WireError:
                    continue
                _touch(msg, wire)
        return one, _wire_seeds()

    if target == "config":
        def one(data: bytes) -> None:
            for expect in (wire.ConfigPatch, None):
                try:
                    msg = wire.decode_config(data, expect=expect)
                except WireError:
                    continue
                _touch(msg, wire)
        return one, _wire_seeds()

    if target == "app":
        def one(data: bytes) -> None:
            for bare_type in ("batch", "labels"):
                try:
                    msg = wire.decode_app(data, bare_type=bare_type, max_bytes=MAX_LEN)
                except WireError:
                    continue
                _touch(msg, wire)
                if isinstance(msg, (wire.RequestBatch, wire.Labels)):  # other types the topic's rule refuses
                    wire.encode_app_json(msg)
        return one, _wire_seeds() + _app_seeds()

    if target in ("blob", "blob_doc"):
        import zstandard

        model = _model()
        seeds = _blob_seeds(model)
        compressor = zstandard.ZstdCompressor(write_checksum=True)
        limits = codec.BlobLimits(max_blob_bytes=1 << 20, max_decoded_bytes=4 << 20)

        def decode(blob: bytes) -> None:
            try:
                sig = codec.decode_blob(blob, limits=limits, **model)
            except KtRejected:
                return
            for t in sig.tensors:  # what the booster relies on
                assert t.indices.numel() == t.values.numel()
                assert t.shape == tuple(model["shapes"][t.name])

        if target == "blob":
            return decode, seeds
        dctx = zstandard.ZstdDecompressor()
        return (lambda data: decode(compressor.compress(data))), [dctx.decompress(s) for s in seeds]

    if target == "chunks":
        def one(data: bytes) -> None:
            # The input is a sequence of (clock step: 1 byte, length: 2 bytes big-endian, message).
            asm = chunking.ChunkAssembler(max_bytes=4096, max_transfers=2, max_buffered_bytes=6000, deadline_s=1.0)
            clock, pos = 0.0, 0
            while pos + 3 <= len(data):
                clock += data[pos] / 64.0
                size = int.from_bytes(data[pos + 1 : pos + 3], "big")
                piece, pos = data[pos + 3 : pos + 3 + size], pos + 3 + size
                try:
                    asm.add(wire.decode(piece, expect=wire.BlobChunk), now=clock)
                except WireError:  # ChunkError included
                    pass
                asm.expire(now=clock)
            asm.expire(now=clock + 10.0)
            assert asm.pending == 0 and asm.buffered_bytes == 0
        chunks = chunking.encode_chunks(b"chunked payload " * 40, chunk_bytes=700)
        seeds = [b"".join(b"\x01" + len(c).to_bytes(2, "big") + c for c in order) for order in (chunks, chunks[::-1], chunks + chunks[:1])]
        return one, seeds

    if target == "topics":
        def one(data: bytes) -> None:
            text = atheris.FuzzedDataProvider(data).ConsumeUnicodeNoSurrogates(len(data))
            topic, _, other = text.partition("\x1f")
            topics.topic_class(topic)
            topics.is_reply_topic(topic)
            topics.strip_share(topic)
            for check in (topics.parse_node_topic, topics.validate_publish_topic, topics.validate_filter,
                          topics.validate_node_id, topics.validate_job_id):
                try:
                    check(topic)
                except TopicError:
                    pass
            try:
                topics.matches(topics.validate_filter(topic), topics.validate_publish_topic(other))
            except TopicError:
                pass
        seeds = [t.encode() for t in ("clue/v1/node/n1/batch", "clue/v1/node/+/reply", "$share/mds/clue/v1/mds/query",
                                      "clue/v1/#\x1fclue/v1/fl/j/global", "clue/v1/relay/r1/reply")]
        return one, seeds

    raise ValueError(f"unknown target {target!r}; known: {TARGETS}")


def _touch(msg, wire) -> None:
    """What consumers do next with a decoded message must not raise either."""
    for value in msg.__dict__.values():
        if isinstance(value, wire.ArrayPayload):
            value.to_numpy()
    wire.encode(msg)


def _child(target: str, runs: int, seconds: int, crash_log: Path) -> None:
    import atheris

    one, seeds = _harness(target)
    CRASH_DIR.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()

    def test_one_input(data: bytes) -> None:
        try:
            one(data)
        except Exception as exc:  # noqa: BLE001 - anything but the typed errors is the finding
            # One record per distinct place and type, not per input: a single bug found a
            # thousand times is still one crash to fix.
            tb = traceback.extract_tb(exc.__traceback__)
            where = f"{type(exc).__name__} at {tb[-1].filename}:{tb[-1].lineno}" if tb else type(exc).__name__
            if where in seen:
                return
            seen.add(where)
            digest = hashlib.sha1(data).hexdigest()[:16]
            path = CRASH_DIR / f"{target}-{digest}.bin"
            path.write_bytes(data)
            with crash_log.open("a") as f:
                f.write(json.dumps({"target": target, "where": where, "error": str(exc)[:300], "input": str(path)}) + "\n")

    corpus = Path(tempfile.mkdtemp(prefix=f"clue-fuzz-{target}-"))
    for i, seed in enumerate(seeds):
        (corpus / f"seed{i}").write_bytes(seed)
    argv = [sys.argv[0], str(corpus), f"-runs={runs}", f"-max_total_time={seconds}", f"-max_len={MAX_LEN}",
            "-timeout=20", "-rss_limit_mb=4096", "-print_final_stats=1"]
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


# --- the driver ----------------------------------------------------------------------------


_DONE = re.compile(r"Done (\d+) runs in (\d+) second")
_STATUS = re.compile(r"^#(\d+)\s", re.M)


def _run_target(target: str, runs: int, seconds: int) -> dict:
    crash_log = Path(tempfile.mkstemp(prefix=f"clue-fuzz-{target}-", suffix=".jsonl")[1])
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.fuzz", "--child", target, "--inputs", str(runs), "--max-seconds", str(seconds),
         "--crash-log", str(crash_log)],
        capture_output=True, text=True, timeout=seconds + 120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    wall = time.monotonic() - t0
    done = _DONE.search(proc.stderr)
    if done:
        inputs = int(done.group(1))
    else:  # killed (libFuzzer's own timeout or rss limit): the last status line it printed
        statuses = _STATUS.findall(proc.stderr)
        inputs = int(statuses[-1]) if statuses else 0
    crashes = [json.loads(line) for line in crash_log.read_text().splitlines() if line.strip()]
    crash_log.unlink()
    if proc.returncode != 0:  # libFuzzer itself stopped on a timeout, an rss blow-up or a signal
        crashes.append({"target": target, "where": f"libFuzzer exit {proc.returncode}", "error": proc.stderr[-2000:]})
    return {"target": target, "inputs": inputs, "seconds": round(wall, 1), "crashes": crashes}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Fuzz every decoder of untrusted bytes with atheris (time-bounded).")
    ap.add_argument("--inputs", type=int, default=1_000_000, help="inputs in total, split evenly across targets")
    ap.add_argument("--max-seconds", type=int, default=1800, help="wall-clock budget in total, split across targets")
    ap.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated subset of {','.join(TARGETS)}")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--crash-log", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("bench.fuzz needs atheris: .venv/bin/pip install -e '.[fuzz]'", file=sys.stderr)
        return 2
    if args.child:
        _child(args.child, args.inputs, args.max_seconds, args.crash_log)
        return 0  # not reached: libFuzzer exits the process
    targets = [t for t in args.targets.split(",") if t]
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        ap.error(f"unknown targets {unknown}; known: {','.join(TARGETS)}")
    deadline = time.monotonic() + args.max_seconds
    results = []
    for i, target in enumerate(targets):
        runs = args.inputs // len(targets) + (1 if i < args.inputs % len(targets) else 0)
        seconds = max(1, int((deadline - time.monotonic()) / (len(targets) - i)))
        result = _run_target(target, runs, seconds)
        results.append(result)
        print(f"{target:9s} inputs {result['inputs']:>9,}  crashes {len(result['crashes'])}  {result['seconds']:.0f} s", flush=True)
        for crash in result["crashes"]:
            print(f"  crash: {crash['where']}: {crash['error'][:200]}  ({crash.get('input', '-')})", flush=True)
    total = sum(r["inputs"] for r in results)
    crashes = sum(len(r["crashes"]) for r in results)
    print(f"fuzz: {total:,} inputs over {len(results)} decoders, {crashes} crashes")
    from bench.common import summary_row, write_json

    path = write_json(
        "fuzz", quick=False,
        settings={"inputs": args.inputs, "max_seconds": args.max_seconds, "targets": targets, "max_len": MAX_LEN},
        results={"inputs": total, "crashes": crashes, "targets": results},
        summary=[summary_row("fuzzing: inputs, crashes (atheris)", "—", "≥ 1,000,000 inputs, 0 crashes",
                             f"{total:,} inputs, {crashes} crashes", total >= 1_000_000 and crashes == 0)],
    )
    print(f"wrote {path}")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
