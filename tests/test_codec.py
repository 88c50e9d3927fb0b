"""The KT blob codec: round trips within the documented bounds, and hostile blobs refused."""

from __future__ import annotations

import io
import math
import resource
import struct
import tracemalloc
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.kt import codec as codec_module
from agent.kt.codec import (
    DELTA_CODECS,
    VALUE_CODECS,
    BlobLimits,
    bytes_per_param,
    decode_blob,
    decoded_size_bound,
    encode_blob,
    value_error_bound,
)
from agent.kt.errors import KtRejected
from agent.kt.significant import SignificantParams, TensorSlice

ARCH = "mlp-test-arch"
LINEAGE = "lineage-7"
NUM_CLASSES = 10
SHAPES: dict[str, tuple[int, ...]] = {
    "fc1.weight": (48, 20),
    "fc1.bias": (48,),
    "fc2.weight": (10, 48),
    "fc2.bias": (10,),
    "temp": (),
    "gain": (1,),
}
CODECS = tuple(c for c in VALUE_CODECS if c not in DELTA_CODECS)


def weights(seed: int, shapes: dict[str, tuple[int, ...]] = SHAPES) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) * 0.05 for name, shape in shapes.items()}


def select(w: dict[str, torch.Tensor], z: float, seed: int, classes=(1, 3, 4)) -> SignificantParams:
    g = torch.Generator().manual_seed(seed)
    slices = []
    for name, t in w.items():
        flat = t.reshape(-1)
        idx = torch.nonzero(torch.rand(flat.numel(), generator=g) < z).reshape(-1)
        slices.append(TensorSlice(name, tuple(t.shape), idx, flat[idx].clone()))
    return SignificantParams(ARCH, LINEAGE, tuple(classes), z, tuple(slices))


def decode(blob: bytes, **kw: Any) -> SignificantParams:
    args: dict[str, Any] = {
        "arch_id": ARCH, "lineage": LINEAGE, "shapes": SHAPES, "num_classes": NUM_CLASSES
    }
    args.update(kw)
    return decode_blob(blob, **args)


def unpack_raw(blob: bytes) -> bytes:
    return zstandard.ZstdDecompressor().decompress(blob)


def unpack(blob: bytes) -> dict[str, Any]:
    return msgpack.unpackb(unpack_raw(blob), raw=False)


def repack(doc: Any) -> bytes:
    raw = msgpack.packb(doc, use_bin_type=True)
    return zstandard.ZstdCompressor(write_checksum=True).compress(raw)


def check_invariants(sig: SignificantParams, shapes=SHAPES, num_classes=NUM_CLASSES) -> None:
    assert sig.arch_id == ARCH and sig.lineage == LINEAGE
    assert len(set(sig.classes)) == len(sig.classes)
    assert all(type(c) is int and 0 <= c < num_classes for c in sig.classes)
    assert isinstance(sig.z, float) and 0.0 < sig.z <= 1.0
    names = [t.name for t in sig.tensors]
    assert len(set(names)) == len(names)
    for t in sig.tensors:
        assert t.shape == shapes[t.name]
        assert t.indices.dtype == torch.int64 and t.indices.dim() == 1
        assert t.values.dtype == torch.float32 and t.values.dim() == 1
        assert t.indices.numel() == t.values.numel()
        if t.indices.numel():
            assert int(t.indices[0]) >= 0 and int(t.indices[-1]) < t.numel
            assert bool((t.indices[1:] > t.indices[:-1]).all())
        assert bool(torch.isfinite(t.values).all())


W = weights(0)
SIG = select(W, 0.5, 1)
BASE = {name: t + 0.01 * torch.randn(t.shape, generator=torch.Generator().manual_seed(2))
        for name, t in W.items()}


# --- round trips -------------------------------------------------------------------------------


def test_float32_round_trip_is_bit_exact() -> None:
    back = decode(encode_blob(SIG, value_codec="float32"))
    check_invariants(back)
    assert (back.classes, back.z) == (SIG.classes, SIG.z)
    for sent, got in zip(SIG.tensors, back.tensors, strict=True):
        assert got.name == sent.name and got.shape == sent.shape
        assert torch.equal(got.indices, sent.indices)
        assert torch.equal(got.values.view(torch.int32), sent.values.view(torch.int32))


@pytest.mark.parametrize("codec", CODECS)
def test_round_trip_within_documented_bound(codec: str) -> None:
    back = decode(encode_blob(SIG, value_codec=codec))
    for sent, got in zip(SIG.tensors, back.tensors, strict=True):
        assert torch.equal(got.indices, sent.indices)
        err = (got.values.double() - sent.values.double()).abs()
        assert bool((err <= value_error_bound(codec, sent.values)).all())


@pytest.mark.parametrize("codec", VALUE_CODECS)
def test_delta_round_trip_within_bound(codec: str) -> None:
    blob = encode_blob(SIG, value_codec=codec, base=BASE)
    assert unpack(blob)["delta"] is True
    back = decode(blob, base=BASE)
    check_invariants(back)
    for sent, got in zip(SIG.tensors, back.tensors, strict=True):
        assert torch.equal(got.indices, sent.indices)
        weight = sent.values.double()
        deltas = weight - BASE[sent.name].reshape(-1)[sent.indices].double()
        bound = value_error_bound(codec, deltas) + 2.0**-23 * (deltas.abs() + weight.abs())
        assert bool(((got.values.double() - sent.values.double()).abs() <= bound).all())
    with pytest.raises(KtRejected, match="no base"):
        decode(blob)


def test_int8_delta_is_more_accurate_than_int8_absolute() -> None:
    def worst(blob: bytes, **kw: Any) -> float:
        back = decode(blob, **kw)
        return max(float((g.values - s.values).abs().max())
                   for s, g in zip(SIG.tensors, back.tensors, strict=True) if s.values.numel())

    assert worst(encode_blob(SIG, value_codec="int8", base=BASE), base=BASE) < worst(
        encode_blob(SIG, value_codec="int8"))


def test_int4_delta_needs_base_and_packs_two_codes_per_byte() -> None:
    with pytest.raises(ValueError, match="base"):
        encode_blob(SIG, value_codec="int4_delta")
    doc = unpack(encode_blob(SIG, value_codec="int4_delta", base=BASE))
    for t in doc["tensors"]:
        assert t["dtype"] == "i4" and len(t["val"]) == (t["n"] + 1) // 2
    assert any(t["n"] % 2 for t in doc["tensors"])  # an odd count, so a padding nibble, is covered


def test_int4_delta_is_smaller_than_int8_delta() -> None:
    def size(codec: str) -> int:
        return len(encode_blob(SIG, value_codec=codec, base=BASE))

    assert size("int4_delta") < size("int8")


def test_int4_delta_codes_every_level_exactly() -> None:
    # Peaked deltas (many zeros): the step is max / 7 = 0.25, above 0.8 RMS, so every multiple of
    # 0.25 lands on its code exactly; codes are nibbles, low first (-7 is 0x9, -1 is 0xF).
    codes = torch.cat([torch.arange(-7, 8), torch.zeros(185, dtype=torch.int64)])
    base = {"fc1.weight": torch.zeros(48, 20)}
    sl = TensorSlice("fc1.weight", (48, 20), torch.arange(200), codes.float() * 0.25)
    blob = encode_blob(SignificantParams(ARCH, LINEAGE, (0,), 0.2, (sl,)), value_codec="int4_delta", base=base)
    t = unpack(blob)["tensors"][0]
    assert t["scale"] == 0.25
    assert t["val"][:8] == bytes([0xA9, 0xCB, 0xED, 0x0F, 0x21, 0x43, 0x65, 0x07])
    assert torch.equal(decode(blob, base=base).tensors[0].values, sl.values)


def test_int4_delta_step_never_drops_below_a_fraction_of_the_rms() -> None:
    # Spread-out deltas: max / 7 would be finer than needed; the step is 0.8 RMS instead.
    vals = torch.linspace(-1.0, 1.0, 9)
    base = {"fc2.bias": torch.zeros(10)}
    sl = TensorSlice("fc2.bias", (10,), torch.arange(9), vals.clone())
    blob = encode_blob(SignificantParams(ARCH, LINEAGE, (0,), 0.9, (sl,)), value_codec="int4_delta", base=base)
    scale = unpack(blob)["tensors"][0]["scale"]
    assert scale == pytest.approx(0.8 * float(vals.double().square().mean().sqrt()))
    err = (decode(blob, base=base).tensors[0].values.double() - vals.double()).abs()
    assert bool((err <= value_error_bound("int4_delta", vals)).all()) and float(err.max()) <= scale / 2 + 1e-7


def test_int4_delta_of_unchanged_weights_is_the_base() -> None:
    sl = TensorSlice("fc2.bias", (10,), torch.tensor([2, 3, 7]), BASE["fc2.bias"][[2, 3, 7]].clone())
    blob = encode_blob(SignificantParams(ARCH, LINEAGE, (), 0.3, (sl,)), value_codec="int4_delta", base=BASE)
    assert unpack(blob)["tensors"][0]["scale"] == 1.0
    assert torch.equal(decode(blob, base=BASE).tensors[0].values, sl.values)


def test_float16_overflow_falls_back_to_float32() -> None:
    big = TensorSlice("fc1.bias", (48,), torch.tensor([0, 5]), torch.tensor([1e6, -3.0]))
    small = TensorSlice("fc2.bias", (10,), torch.tensor([1]), torch.tensor([0.25]))
    sig = SignificantParams(ARCH, LINEAGE, (0,), 1.0, (big, small))
    blob = encode_blob(sig, value_codec="float16")
    assert [t["dtype"] for t in unpack(blob)["tensors"]] == ["f4", "f2"]
    assert decode(blob).tensors[0].values.tolist() == [1e6, -3.0]
    assert bool((value_error_bound("float16", big.values) == 0).all())


BIG = {"big": (3, 4000)}  # more values than the small-tensor (numpy) widening path takes


@pytest.mark.parametrize("numel", [3, 12_000])
def test_float16_widens_every_kind_of_value_exactly(numel: int) -> None:
    special = np.array([0.0, -0.0, 65504.0, -65504.0, 2.0**-24, -(2.0**-24), 2.0**-14, 1.0 / 3], np.float16)
    rest = np.random.default_rng(0).standard_normal(max(numel - special.size, 0)).astype(np.float16)
    half = np.concatenate([special, rest])[:numel]
    sl = TensorSlice("t", (numel,), torch.arange(numel), torch.from_numpy(half.astype(np.float32)))
    blob = encode_blob(SignificantParams(ARCH, LINEAGE, (), 1.0, (sl,)), value_codec="float16")
    got = decode(blob, shapes={"t": (numel,)}).tensors[0].values
    assert got.dtype == torch.float32 and got.numpy().flags.writeable
    assert np.array_equal(got.numpy().view(np.uint32), half.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("dtype", ["f2", "f4"])
def test_non_finite_value_in_a_large_tensor_rejected(bad: float, dtype: str) -> None:
    n = math.prod(BIG["big"])
    sl = TensorSlice("big", BIG["big"], torch.arange(n), torch.zeros(n))
    doc = unpack(encode_blob(SignificantParams(ARCH, LINEAGE, (), 1.0, (sl,)), value_codec="float16"))
    vals = np.zeros(n, "<f2" if dtype == "f2" else "<f4")
    vals[n - 1] = bad
    doc["tensors"][0].update(dtype=dtype, val=vals.tobytes())
    with pytest.raises(KtRejected, match="finite"):
        decode(repack(doc), shapes=BIG)


def _reference(doc_tensor: dict[str, Any], base: torch.Tensor | None) -> np.ndarray:
    """The format's definition, one value at a time: code * scale (+ base) in float64, then float32."""
    raw, n = doc_tensor["val"], doc_tensor["n"]
    if doc_tensor["dtype"] == "i1":
        codes = [int.from_bytes(raw[i : i + 1], "little", signed=True) for i in range(n)]
    else:
        nibbles = [(raw[i // 2] >> (4 * (i % 2))) & 0x0F for i in range(n)]
        codes = [c - 16 if c >= 8 else c for c in nibbles]
    rebuilt = np.array([c * doc_tensor["scale"] for c in codes], np.float64)
    return rebuilt if base is None else rebuilt + base.double().numpy()


@pytest.mark.parametrize("dtype", ["i1", "i4"])
@pytest.mark.parametrize("with_base", [False, True])
def test_scaled_codes_rebuild_exactly_as_defined(dtype: str, with_base: bool) -> None:
    # Every code each byte can carry, at an awkward scale: the lookup-table rebuild must give the
    # very float32 the definition does.
    codes = np.arange(-128, 128) if dtype == "i1" else np.tile(np.arange(-7, 8), 20)
    n = codes.size if dtype == "i1" else codes.size - 1  # an odd i4 count: a padding nibble
    base = torch.randn(1000, generator=torch.Generator().manual_seed(5))
    sl = TensorSlice("t", (1000,), torch.arange(n), torch.zeros(n))
    doc = unpack(encode_blob(SignificantParams(ARCH, LINEAGE, (), 1.0, (sl,)), value_codec="int8"))
    t = doc["tensors"][0]
    scale = 0.1 / 3
    if dtype == "i1":
        val = codes.astype(np.int8).tobytes()
    else:
        val = codec_module._nibbles_encode(codes[:n].astype(np.int8))
    t.update(dtype=dtype, scale=scale, val=val)
    doc["delta"] = with_base
    kw: dict[str, Any] = {"shapes": {"t": (1000,)}}
    if with_base:
        kw["base"] = {"t": base}
    got = decode(repack(doc), **kw).tensors[0].values.numpy()
    want = _reference(t, base[:n] if with_base else None).astype(np.float32)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_int8_all_zero_tensor() -> None:
    sl = TensorSlice("fc2.bias", (10,), torch.tensor([2, 3]), torch.zeros(2))
    blob = encode_blob(SignificantParams(ARCH, LINEAGE, (), 0.2, (sl,)), value_codec="int8")
    assert decode(blob).tensors[0].values.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("n,enc", [(9, "varint"), (10, "bitmask"), (11, "bitmask")])
def test_index_encoding_boundary_at_one_byte_per_position(n: int, enc: str) -> None:
    """80 positions: a 10-byte bitmask against one byte per varint; a tie goes to the bitmask."""
    sl = TensorSlice("w", (80,), torch.arange(n) * 7, torch.ones(n))
    blob = encode_blob(SignificantParams(ARCH, LINEAGE, (0,), 0.5, (sl,)), value_codec="float32")
    assert [t["enc"] for t in unpack(blob)["tensors"]] == [enc]
    assert decode(blob, shapes={"w": (80,)}).tensors[0].indices.tolist() == (torch.arange(n) * 7).tolist()


def test_dense_selection_uses_bitmask_and_sparse_uses_varint() -> None:
    shapes = {"dense": (1000, 3), "sparse": (100_000,), "huge": (1 << 40,)}
    positions = {
        "dense": torch.nonzero(torch.rand(3000, generator=torch.Generator().manual_seed(3)) < 0.5),
        "sparse": torch.tensor([0, 127, 128, 16_383, 16_384, 99_999]),
        # Gaps of 2**40 need 6-byte varints; a bitmask would be 128 GiB.
        "huge": torch.tensor([0, 5, (1 << 40) - 1]),
    }
    slices = tuple(
        TensorSlice(name, shapes[name], p.reshape(-1), torch.arange(p.numel(), dtype=torch.float32))
        for name, p in positions.items()
    )
    sig = SignificantParams(ARCH, LINEAGE, (0,), 0.5, slices)
    blob = encode_blob(sig, value_codec="float32")
    assert [t["enc"] for t in unpack(blob)["tensors"]] == ["bitmask", "varint", "varint"]
    back = decode(blob, shapes=shapes)
    for sent, got in zip(slices, back.tensors, strict=True):
        assert torch.equal(got.indices, sent.indices) and torch.equal(got.values, sent.values)


@settings(max_examples=150, deadline=None)
@given(
    numel=st.integers(0, 5000),
    density=st.sampled_from([0.0005, 0.01, 0.1, 0.5, 1.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_index_set_round_trips(numel: int, density: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    idx = torch.from_numpy(np.flatnonzero(rng.random(numel) < density))
    vals = torch.from_numpy(rng.standard_normal(idx.numel()).astype(np.float32))
    sl = TensorSlice("t", (numel,), idx, vals)
    # One more parameter, so that an empty index set still makes a blob that carries something.
    one = TensorSlice("one", (1,), torch.tensor([0]), torch.tensor([1.0]))
    blob = encode_blob(SignificantParams(ARCH, LINEAGE, (), 1.0, (sl, one)), value_codec="float32")
    back = decode(blob, shapes={"t": (numel,), "one": (1,)})
    assert torch.equal(back.tensors[0].indices, idx)
    assert torch.equal(back.tensors[0].values, vals)


def test_bytes_per_param() -> None:
    blob = encode_blob(SIG)
    assert bytes_per_param(blob, SIG) == len(blob) / SIG.count
    with pytest.raises(ValueError):
        bytes_per_param(blob, SignificantParams(ARCH, LINEAGE, (), 1.0, ()))


# --- encoder input checks ----------------------------------------------------------------------


def _one(idx: list[int], vals: list[float], name: str = "fc2.bias") -> SignificantParams:
    sl = TensorSlice(name, (10,), torch.tensor(idx, dtype=torch.int64), torch.tensor(vals))
    return SignificantParams(ARCH, LINEAGE, (0,), 0.5, (sl,))


@pytest.mark.parametrize(
    ("sig", "kw", "match"),
    [
        (_one([0, 1], [1.0, math.nan]), {}, "finite"),
        (_one([0, 1], [1.0, math.inf]), {}, "finite"),
        (_one([3, 1], [1.0, 2.0]), {}, "increasing"),
        (_one([1, 1], [1.0, 2.0]), {}, "increasing"),
        (_one([0, 10], [1.0, 2.0]), {}, "increasing"),
        (_one([-1, 2], [1.0, 2.0]), {}, "increasing"),
        (_one([0, 1], [1.0]), {}, "values"),
        (_one([0], [1.0]), {"value_codec": "bfloat16"}, "codec"),
        (_one([0], [1.0]), {"base": {}}, "missing from base"),
        (_one([0], [1.0]), {"base": {"fc2.bias": torch.zeros(11)}}, "elements"),
        (_one([0], [3e38]), {"base": {"fc2.bias": torch.full((10,), -3e38)}}, "delta"),
        (SignificantParams(ARCH, LINEAGE, (1, 1), 0.5, ()), {}, "classes"),
        (SignificantParams(ARCH, LINEAGE, (True,), 0.5, ()), {}, "classes"),
        (SignificantParams(ARCH, LINEAGE, (), 0.0, ()), {}, "z"),
        (SignificantParams(ARCH, LINEAGE, (), math.nan, ()), {}, "z"),
        (SignificantParams(ARCH, LINEAGE, (), 0.5, _one([0], [1.0]).tensors * 2), {}, "unique"),
    ],
)
def test_encoder_rejects_bad_input(sig: SignificantParams, kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        encode_blob(sig, **kw)


def test_encoder_rejects_wrong_tensor_dtypes() -> None:
    bad_idx = TensorSlice("t", (4,), torch.tensor([0, 1], dtype=torch.int32), torch.ones(2))
    bad_val = TensorSlice("t", (4,), torch.tensor([0, 1]), torch.ones(2, dtype=torch.float64))
    for sl in (bad_idx, bad_val):
        with pytest.raises(ValueError, match="1-D"):
            encode_blob(SignificantParams(ARCH, LINEAGE, (), 0.5, (sl,)))


def test_blob_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_tensors"):
        BlobLimits(max_tensors=0)


# --- hostile blobs -----------------------------------------------------------------------------

GOOD = encode_blob(SIG, value_codec="int8")
GOOD_I4 = encode_blob(SIG, value_codec="int4_delta", base=BASE)


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (b"", "not a zstd frame"),
        (b"definitely not a blob", "not a zstd frame"),
        (msgpack.packb({"v": 1}), "not a zstd frame"),
        (GOOD[:3], "not a zstd frame"),
        (GOOD[: len(GOOD) // 2], "truncated|corrupt"),
        (GOOD[:-1], "truncated|corrupt"),
        (GOOD + b"\0", "after its zstd frame|corrupt"),
        (GOOD + GOOD, "after its zstd frame"),
        (zstandard.ZstdCompressor(write_checksum=False).compress(msgpack.packb({})), "checksum"),
        (zstandard.ZstdCompressor(write_checksum=True).compress(b"\xc1"), "msgpack"),
        (repack([1, 2, 3]), "not a map"),
        (repack({"v": 1}), "missing keys"),
    ],
)
def test_garbage_and_truncation_rejected(blob: bytes, match: str) -> None:
    with pytest.raises(KtRejected, match=match):
        decode(blob)


def test_msgpack_rejection_names_the_error() -> None:
    # msgpack's FormatError has an empty message: the type must still say what went wrong.
    with pytest.raises(KtRejected, match="^blob is not valid msgpack: FormatError$"):
        decode(zstandard.ZstdCompressor(write_checksum=True).compress(b"\xc1"))
    with pytest.raises(KtRejected, match="^blob is not valid msgpack: ExtraData: .+"):
        decode(zstandard.ZstdCompressor(write_checksum=True).compress(b"\x01\x02"))


@pytest.mark.parametrize(
    ("tensors", "match"),
    [
        (lambda ts: [], "^blob carries no parameters$"),
        (lambda ts: [{**t, "enc": "varint", "idx": b"", "n": 0, "val": b""} for t in ts],
         "^blob carries no parameters: its 6 tensors are empty$"),
    ],
    ids=["no tensors", "empty tensors"],
)
def test_blob_without_parameters_rejected(tensors: Callable[[list[Any]], list[Any]], match: str) -> None:
    doc = unpack(encode_blob(SIG, value_codec="float32"))
    doc["tensors"] = tensors(doc["tensors"])
    with pytest.raises(KtRejected, match=match):
        decode(repack(doc))


def test_corrupted_frame_fails_checksum() -> None:
    buf = bytearray(GOOD)
    buf[len(buf) // 2] ^= 0x01
    with pytest.raises(KtRejected) as info:
        decode(bytes(buf))
    assert info.value.__cause__ is not None


def test_oversized_blob_rejected_before_decompressing() -> None:
    with pytest.raises(KtRejected, match="over the 100 cap"):
        decode(GOOD, limits=BlobLimits(max_blob_bytes=100))


@pytest.fixture(scope="module")
def gigabyte_frame() -> bytes:
    # A real frame of 1 GiB of zeros: zstd writes it in ~0.1 s and ~32 KiB.
    buf = io.BytesIO()
    writer = zstandard.ZstdCompressor(level=1, write_checksum=True).stream_writer(
        buf, size=1 << 30, closefd=False
    )
    chunk = bytes(4 << 20)
    for _ in range(256):
        writer.write(chunk)
    writer.flush(zstandard.FLUSH_FRAME)
    return buf.getvalue()


def test_frame_declaring_one_gib_rejected_without_allocating(gigabyte_frame: bytes) -> None:
    assert zstandard.frame_content_size(gigabyte_frame) == 1 << 30
    assert len(gigabyte_frame) < BlobLimits().max_blob_bytes
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(KtRejected, match="declares 1073741824 decoded bytes"):
        decode(gigabyte_frame)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_kib < 256 << 10


def _unsized(raw: bytes) -> bytes:
    cobj = zstandard.ZstdCompressor(write_checksum=True, write_content_size=False).compressobj()
    return cobj.compress(raw) + cobj.flush()


def test_frame_without_declared_size_is_bounded_while_reading() -> None:
    raw = unpack_raw(GOOD)
    unsized = _unsized(raw)
    assert zstandard.frame_content_size(unsized) == -1
    check_invariants(decode(unsized))
    cap = len(raw) - 1
    with pytest.raises(KtRejected, match=f"more than the {cap} byte cap"):
        decode(unsized, limits=BlobLimits(max_decoded_bytes=cap))
    with pytest.raises(KtRejected, match="more than the 1048576 byte cap"):
        decode(_unsized(bytes(3 << 20)), max_decoded_bytes=1 << 20)


def _zeros_frame(size: int, *, sized: bool) -> bytes:
    """A real frame of ``size`` zero bytes, with or without its content size: a few KiB of zstd."""
    buf = io.BytesIO()
    cctx = zstandard.ZstdCompressor(level=1, write_checksum=True, write_content_size=sized)
    writer = cctx.stream_writer(buf, size=size if sized else -1, closefd=False)
    chunk = bytes(4 << 20)
    for _ in range(size // len(chunk)):
        writer.write(chunk)
    writer.flush(zstandard.FLUSH_FRAME)
    return buf.getvalue()


@pytest.fixture(scope="module")
def frames_64mib() -> dict[str, bytes]:
    sized = _zeros_frame(64 << 20, sized=True)
    # The same frame claiming 1000 bytes (FHD 0x84: a 4-byte content size after the window byte).
    assert sized[4] == 0x84
    return {
        "sized": sized,
        "unsized": _zeros_frame(64 << 20, sized=False),
        "lying": sized[:6] + struct.pack("<I", 1000) + sized[10:],
    }


def _peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of Python-level allocation (zstandard's output buffers included) while ``fn`` runs."""
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("sized", "declares 67108864 decoded bytes, over the {cap} cap"),
        ("unsized", "decodes to more than the {cap} byte cap"),
        ("lying", "corrupt|truncated"),
    ],
    ids=["sized", "unsized", "lying"],
)
def test_frame_over_the_model_bound_rejected_within_bounded_memory(
    frames_64mib: dict[str, bytes], kind: str, match: str
) -> None:
    """A few KiB that inflate to 64 MiB, far over what any blob for this small model holds."""
    frame = frames_64mib[kind]
    assert len(frame) < 8 << 10
    cap = decoded_size_bound(SHAPES, NUM_CLASSES)

    def attempt() -> None:
        with pytest.raises(KtRejected, match=match.format(cap=cap)):
            decode(frame)

    assert _peak_bytes(attempt) < 4 << 20


def test_decoded_size_bound_holds_every_blob_the_encoder_makes() -> None:
    full = SignificantParams(ARCH, LINEAGE, tuple(range(NUM_CLASSES)), 1.0, tuple(
        TensorSlice(name, tuple(t.shape), torch.arange(t.numel()), t.reshape(-1).clone())
        for name, t in W.items()
    ))
    blob = encode_blob(full, value_codec="float32")
    raw_len = len(unpack_raw(blob))
    assert raw_len <= decoded_size_bound(SHAPES, NUM_CLASSES)
    check_invariants(decode(blob))
    # The caller's own bound, under the model's, is the one enforced.
    with pytest.raises(KtRejected, match=f"declares {raw_len} decoded bytes, over the {raw_len - 1} cap"):
        decode(blob, max_decoded_bytes=raw_len - 1)
    check_invariants(decode(blob, max_decoded_bytes=raw_len))
    with pytest.raises(ValueError, match="max_decoded_bytes"):
        decode(blob, max_decoded_bytes=0)


def test_wrong_identity_rejected() -> None:
    with pytest.raises(KtRejected, match="arch_id"):
        decode(GOOD, arch_id="other-arch")
    with pytest.raises(KtRejected, match="lineage"):
        decode(GOOD, lineage="other-lineage")
    with pytest.raises(KtRejected, match="shape"):
        decode(GOOD, shapes={**SHAPES, "fc1.weight": (20, 48)})
    with pytest.raises(KtRejected, match="not a parameter"):
        decode(GOOD, shapes={k: v for k, v in SHAPES.items() if k != "fc2.bias"})
    with pytest.raises(KtRejected, match="classes"):
        decode(GOOD, num_classes=4)


def test_wrong_shape_rejected_for_int4_delta() -> None:
    with pytest.raises(KtRejected, match="shape"):
        decode(GOOD_I4, base=BASE, shapes={**SHAPES, "fc1.weight": (20, 48)})


def _tensor(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(t for t in doc["tensors"] if t["name"] == name)


def _set(key: str, value: Any, tensor: str | None = None) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        (doc if tensor is None else _tensor(doc, tensor))[key] = value
    return mutate


def _drop(key: str, tensor: str | None = None) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        del (doc if tensor is None else _tensor(doc, tensor))[key]
    return mutate


def _values(name: str, dtype: str, arr: np.ndarray) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        t = _tensor(doc, name)
        t.pop("scale", None)
        t.update(dtype=dtype, val=arr.astype(arr.dtype.newbyteorder("<")).tobytes())
    return mutate


def _varint(name: str, raw: bytes, n: int) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        t = _tensor(doc, name)
        t.update(enc="varint", idx=raw, n=n)
        t["val"] = t["val"][:n]  # int8 values: one byte each
    return mutate


def _dup_tensor(doc: dict[str, Any]) -> None:
    doc["tensors"].append(dict(doc["tensors"][0]))


def _bias_n(doc: dict[str, Any]) -> int:
    return _tensor(doc, "fc2.bias")["n"]


HOSTILE_FIELDS: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("missing key", _drop("z"), "missing keys \\['z'\\]"),
    ("unknown key", _set("extra", 1), "unknown keys \\['extra'\\]"),
    ("version 2", _set("v", 2), "version"),
    ("version bool", _set("v", True), "version"),
    ("arch_id type", _set("arch_id", 5), "arch_id"),
    ("classes repeat", _set("classes", [1, 1]), "repeat"),
    ("classes range", _set("classes", [10]), "classes"),
    ("classes negative", _set("classes", [-1]), "classes"),
    ("classes bool", _set("classes", [True]), "classes"),
    ("classes not list", _set("classes", 3), "classes"),
    ("z zero", _set("z", 0.0), "z must"),
    ("z above one", _set("z", 1.5), "z must"),
    ("z nan", _set("z", math.nan), "z must"),
    ("z int", _set("z", 1), "z must"),
    ("delta int", _set("delta", 1), "delta must"),
    ("delta without base", _set("delta", True), "no base"),
    ("tensors map", _set("tensors", {}), "tensors must"),
    ("tensor not map", _set("tensors", [1]), "not a map"),
    ("duplicate tensor", _dup_tensor, "twice"),
    ("name type", _set("name", b"fc1.bias", "fc1.bias"), "name must"),
    ("name unknown", _set("name", "fc9.weight", "fc1.bias"), "not a parameter"),
    ("tensor missing key", _drop("n", "fc1.bias"), "missing keys \\['n'\\]"),
    ("shape wrong", _set("shape", [8, 6], "fc1.bias"), "shape"),
    ("shape float", _set("shape", [48.0], "fc1.bias"), "shape"),
    ("shape bool", _set("shape", [True], "gain"), "shape"),
    ("shape ndim", _set("shape", [1] * 9, "fc1.bias"), "at most 8"),
    ("enc unknown", _set("enc", "rle", "fc1.bias"), "index encoding"),
    ("idx str", _set("idx", "abc", "fc1.bias"), "bin"),
    ("n bool", _set("n", True, "fc1.bias"), "n must"),
    ("n negative", _set("n", -1, "fc1.bias"), "n must"),
    ("n above numel", _set("n", 49, "fc1.bias"), "n must"),
    ("n mismatch", lambda d: _tensor(d, "fc1.bias").update(n=_tensor(d, "fc1.bias")["n"] - 1),
     "bits set"),
    ("bitmask length", lambda d: _tensor(d, "fc2.bias").update(enc="bitmask", idx=b"\x01"),
     "bitmask is 1 bytes"),
    ("bitmask padding", lambda d: _tensor(d, "fc2.bias").update(enc="bitmask", idx=b"\x00\x04"),
     "padding"),
    ("varint cut", _varint("fc2.bias", b"\x01\x81", 2), "mid-number"),
    ("varint count", _varint("fc2.bias", b"\x01\x01", 1), "hold 2 numbers"),
    ("varint past numel", _varint("fc2.bias", b"\x05\x05", 2), "past numel"),
    ("varint gap past numel", _varint("fc2.bias", b"\x0a", 1), "past numel"),
    ("varint huge", _varint("fc2.bias", b"\xff" * 9 + b"\x7f", 1), "longer than 9"),
    ("varint overlong", _varint("fc2.bias", b"\x81\x00", 1), "shortest"),
    ("dtype unknown", _set("dtype", "f8", "fc1.bias"), "unknown keys|dtype"),
    ("dtype list", lambda d: (_drop("scale", "fc1.bias")(d), _set("dtype", [1], "fc1.bias")(d)),
     "dtype"),
    ("val empty", _values("fc1.bias", "f4", np.zeros(0, np.float32)), "val is"),
    ("scale on float", lambda d: _tensor(d, "fc1.bias").update(dtype="f4"), "unknown keys"),
    ("scale missing", _drop("scale", "fc1.bias"), "missing keys \\['scale'\\]"),
    ("scale zero", _set("scale", 0.0, "fc1.bias"), "scale"),
    ("scale negative", _set("scale", -1.0, "fc1.bias"), "scale"),
    ("scale inf", _set("scale", math.inf, "fc1.bias"), "scale"),
    ("scale nan", _set("scale", math.nan, "fc1.bias"), "scale"),
    ("scale int", _set("scale", 1, "fc1.bias"), "scale"),
    ("scale overflows", _set("scale", 1e308, "fc1.bias"), "finite"),
    ("val short", lambda d: _tensor(d, "fc1.bias").update(val=_tensor(d, "fc1.bias")["val"][1:]),
     "val is"),
    ("f4 nan", lambda d: _values("fc2.bias", "f4", np.full(_bias_n(d), np.nan, np.float32))(d),
     "finite"),
    ("f4 inf", lambda d: _values("fc2.bias", "f4", np.full(_bias_n(d), np.inf, np.float32))(d),
     "finite"),
    ("f2 inf", lambda d: _values("fc2.bias", "f2", np.full(_bias_n(d), np.inf, np.float16))(d),
     "finite"),
    ("f2 nan", lambda d: _values("fc2.bias", "f2", np.full(_bias_n(d), np.nan, np.float16))(d),
     "finite"),
]


def _i4_code(code: int) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        t = _tensor(doc, "fc1.weight")
        t["val"] = bytes([code & 0x0F | t["val"][0] & 0xF0]) + t["val"][1:]
    return mutate


def _i4_pad(doc: dict[str, Any]) -> None:
    t = next(t for t in doc["tensors"] if t["n"] % 2)
    t["val"] = t["val"][:-1] + bytes([t["val"][-1] | 0x10])


HOSTILE_I4: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("i4 truncated", lambda d: _tensor(d, "fc1.weight").update(val=_tensor(d, "fc1.weight")["val"][:-1]),
     "val is"),
    ("i4 oversized", lambda d: _tensor(d, "fc1.weight").update(val=_tensor(d, "fc1.weight")["val"] + b"\0"),
     "val is"),
    ("i4 empty", _set("val", b"", "fc1.weight"), "val is"),
    ("i4 n mismatch", lambda d: _tensor(d, "fc1.weight").update(n=_tensor(d, "fc1.weight")["n"] + 2),
     "bits set|varint"),
    ("i4 code -8", _i4_code(-8), "-8"),
    ("i4 padding", _i4_pad, "padding nibble"),
    ("i4 scale missing", _drop("scale", "fc1.weight"), "missing keys \\['scale'\\]"),
    ("i4 scale zero", _set("scale", 0.0, "fc1.weight"), "scale"),
    ("i4 scale nan", _set("scale", math.nan, "fc1.weight"), "scale"),
    ("i4 scale int", _set("scale", 1, "fc1.weight"), "scale"),
    ("i4 scale overflows", _set("scale", 1e308, "fc1.weight"), "finite"),
    ("i4 val str", _set("val", "ab", "fc1.weight"), "bin"),
    ("i4 shape wrong", _set("shape", [20, 48], "fc1.weight"), "shape"),
    ("i4 dtype unknown", _set("dtype", "i2", "fc1.weight"), "unknown keys|dtype"),
]


@pytest.mark.parametrize(("mutate", "match"), [(m, r) for _, m, r in HOSTILE_I4],
                         ids=[i for i, _, _ in HOSTILE_I4])
def test_hostile_int4_delta_fields_rejected(mutate: Callable[[dict[str, Any]], None], match: str) -> None:
    doc = unpack(GOOD_I4)
    mutate(doc)
    with pytest.raises(KtRejected, match=match):
        decode(repack(doc), base=BASE)


def test_int4_delta_largest_code_is_accepted() -> None:
    doc = unpack(GOOD_I4)
    _i4_code(7)(doc)
    t = _tensor(doc, "fc1.weight")
    first = decode(repack(doc), base=BASE).by_name()["fc1.weight"]
    want = BASE["fc1.weight"].reshape(-1)[first.indices[0]].double() + 7 * t["scale"]
    assert float(first.values[0]) == pytest.approx(float(want), rel=2**-23)


@pytest.mark.parametrize(("mutate", "match"), [(m, r) for _, m, r in HOSTILE_FIELDS],
                         ids=[i for i, _, _ in HOSTILE_FIELDS])
def test_hostile_fields_rejected(mutate: Callable[[dict[str, Any]], None], match: str) -> None:
    doc = unpack(GOOD)
    assert _bias_n(doc) >= 2  # the cases above need a few selected biases
    mutate(doc)
    with pytest.raises(KtRejected, match=match):
        decode(repack(doc))


def test_msgpack_limits_and_extensions_rejected() -> None:
    doc = unpack(GOOD)
    doc["classes"] = list(range(5))
    with pytest.raises(KtRejected, match="msgpack"):
        decode(repack(doc), limits=BlobLimits(max_classes=4, max_tensors=4, max_ndim=4))
    doc = unpack(GOOD)
    doc["z"] = msgpack.ExtType(1, b"\0")
    with pytest.raises(KtRejected, match="msgpack"):
        decode(repack(doc))
    doc = unpack(GOOD)
    doc["tensors"][0]["name"] = "x" * 300
    with pytest.raises(KtRejected, match="msgpack"):
        decode(repack(doc))
    with pytest.raises(KtRejected, match="msgpack"):
        decode(repack({1: 2}))


# --- fuzzing: only KtRejected escapes, and what decodes is sound ---------------------------------

SEEDS = [
    encode_blob(select(W, z, seed), value_codec=codec, base=base)
    for z, seed in ((0.5, 4), (0.02, 5))
    for codec in VALUE_CODECS
    for base in ((BASE,) if codec in DELTA_CODECS else (None, BASE))
]
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _decode_or_reject(blob: bytes) -> None:
    try:
        back = decode(blob, base=BASE)
    except KtRejected:
        return
    check_invariants(back)


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(("flip", "insert", "delete")))
        at = draw(st.integers(0, len(buf)))
        if op == "insert":
            buf[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif at < len(buf) and op == "flip":
            buf[at] ^= draw(st.integers(1, 255))
        else:
            del buf[at : at + draw(st.integers(1, 8))]
    return bytes(buf)


@FUZZ
@given(st.binary(max_size=512))
def test_fuzz_arbitrary_bytes(blob: bytes) -> None:
    _decode_or_reject(blob)


@FUZZ
@given(st.sampled_from(SEEDS).flatmap(mutated))
def test_fuzz_mutated_compressed_blob(blob: bytes) -> None:
    _decode_or_reject(blob)


@FUZZ
@given(st.sampled_from([unpack_raw(s) for s in SEEDS]).flatmap(mutated))
def test_fuzz_mutated_msgpack(raw: bytes) -> None:
    _decode_or_reject(zstandard.ZstdCompressor(write_checksum=True).compress(raw))


MSGPACK_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=12) | st.binary(max_size=16),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)
TOP_KEYS = ("v", "arch_id", "lineage", "classes", "z", "delta", "tensors", "extra")
TENSOR_KEYS = ("name", "shape", "enc", "idx", "n", "dtype", "scale", "val", "extra")


@FUZZ
@given(
    seed=st.sampled_from(SEEDS),
    where=st.integers(-1, 4),
    key=st.sampled_from(TOP_KEYS + TENSOR_KEYS),
    value=MSGPACK_VALUES | st.just(KeyError),
)
def test_fuzz_replaced_fields(seed: bytes, where: int, key: str, value: Any) -> None:
    doc = unpack(seed)
    target = doc if where < 0 else doc["tensors"][where]
    if value is KeyError:
        target.pop(key, None)
    else:
        target[key] = value
    _decode_or_reject(repack(doc))
