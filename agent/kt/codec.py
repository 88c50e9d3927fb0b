"""Knowledge-transfer blob codec: significant parameters to bytes and back.

A blob is one zstd frame (content size and checksum written) around one msgpack map::

    {v: 1, arch_id, lineage, classes: [int], z: float, delta: bool,
     tensors: [{name, shape: [int], enc: "bitmask" | "varint", idx: bin, n: int,
                dtype: "f4" | "f2" | "i1" | "i4", scale: float (only with "i1" and "i4"), val: bin}]}

Index encodings (the encoder picks the shorter per tensor):

- ``bitmask``: ``np.packbits`` over all ``numel`` flat positions, little bit order (position
  ``p`` is bit ``p % 8`` of byte ``p // 8``); ``ceil(numel / 8)`` bytes, padding bits zero.
- ``varint``: unsigned LEB128 of ``gap - 1`` for each position, where ``gap`` is the distance from
  the previous position and the first is measured from -1 (so the first number is the first
  position itself). Every byte string of complete varints is thus strictly increasing.

Values are little-endian; ``i4`` packs two 4-bit two's-complement codes in [-7, 7] per byte, the
first in the low nibble, and an odd count leaves the last high nibble zero (``ceil(n / 2)`` bytes;
the code -8 is never written and is refused). With ``delta`` the values are ``weight - base`` at
the same positions, and the receiver adds its own copy of the base back. Worst-case error of each
value codec, per value ``v`` actually coded (the delta in delta mode), is what
:func:`value_error_bound` returns:

==========  ==================================================================================
float32     exact
float16     ``|v| * 2**-11`` (``2**-25`` absolute below float16's normal range); a tensor with a
            value that overflows float16 is sent as float32 instead (per-tensor ``dtype``)
int8        per-tensor ``scale = max|v| / 127``, ``q = round(v / scale)``; error ``scale / 2``
            plus one float32 rounding of the rebuilt value
int4_delta  deltas only (``base`` required): per-tensor ``scale = max(max|v| / 7, 0.8 rms(v))``,
            ``q = round(v / scale)`` in [-7, 7] sent as ``i4`` codes; error ``scale / 2`` plus one
            float32 rounding
==========  ==================================================================================

``int4_delta`` is the small-payload codec: deltas from the shared base are narrow, and zstd
entropy-codes the 4-bit codes. The step is at least 0.8 of the deltas' RMS, so the coding error
stays near ``0.8 / sqrt(12) ≈ 0.23`` of their RMS whatever their shape: an MLP helper's deltas
after 40 online batches are peaked (max ≈ 4.6 RMS; a ``max / 3`` step zeroed 59 % of them, and a
``max / 2`` step cost the in-process experiment its adaptability), while a helper's after a few
Adam steps are close to uniform (max ≈ 1.5–2.5 RMS), where ``max / 7`` would cost nearly 4 bits.

Delta mode adds at most ``2**-23 * (|delta| + |weight|)``: the delta is rounded to float32 for the
float32 codec, and the rebuilt weight is rounded to float32 once more.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import msgpack
import numpy as np
import torch
import zstandard

from agent.kt.errors import KtRejected
from agent.kt.significant import SignificantParams, TensorSlice

ValueCodec = Literal["float32", "float16", "int8", "int4_delta"]
VALUE_CODECS: tuple[ValueCodec, ...] = ("float32", "float16", "int8", "int4_delta")
# Codecs that only code deltas from the shared base: the encoder needs ``base`` for them.
DELTA_CODECS: frozenset[str] = frozenset({"int4_delta"})

FORMAT_VERSION = 1

_TOP_KEYS = frozenset({"v", "arch_id", "lineage", "classes", "z", "delta", "tensors"})
_TENSOR_KEYS = frozenset({"name", "shape", "enc", "idx", "n", "dtype", "val"})
_DTYPES: dict[str, np.dtype] = {"f4": np.dtype("<f4"), "f2": np.dtype("<f2"), "i1": np.dtype("i1")}
_SCALED_DTYPES = frozenset({"i1", "i4"})
_INT8_LEVELS = 127
_INT4_LEVELS = 7
# int4_delta's smallest step, in units of the deltas' RMS (module docstring).
_INT4_MIN_STEP = 0.8
# 9 LEB128 bytes carry 63 bits: every int64 position fits, and nothing longer is ever needed.
_VARINT_MAX_BYTES = 9
_F16_RELATIVE = 2.0**-11
_F16_SUBNORMAL_ABS = 2.0**-25
# One float32 rounding of the rebuilt value, with slack for the float64 steps before it.
_F32_ROUNDING = 2.0**-23
# Below this many float16 values numpy's conversions (to and from float32) beat torch's call overhead.
_TORCH_WIDEN_MIN = 4096
# decoded_size_bound's terms (its docstring says why each is enough).
_BOUND_PER_PARAM = 4 + _VARINT_MAX_BYTES
_BOUND_PER_TENSOR = 512
_BOUND_PER_CLASS = 9
_BOUND_TOP = 64 << 10
# What one streaming read of a frame without a declared size may produce.
_STREAM_CHUNK = 1 << 20


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class BlobLimits:
    """Caps the decoder enforces on an untrusted blob before and while reading it.

    ``max_blob_bytes`` bounds the compressed input and ``max_decoded_bytes`` what zstd may
    produce whatever the model (``decode_blob`` lowers it to the model's own bound); the others
    bound the msgpack structure.
    """

    max_blob_bytes: int = 64 << 20
    max_decoded_bytes: int = 256 << 20
    max_tensors: int = 1024
    max_ndim: int = 8
    max_name_len: int = 256
    max_classes: int = 4096

    def __post_init__(self) -> None:
        for field, value in vars(self).items():
            if not _is_int(value) or value <= 0:
                raise ValueError(f"BlobLimits.{field} must be a positive int, got {value!r}")


def value_error_bound(codec: ValueCodec, values: torch.Tensor) -> torch.Tensor:
    """Worst-case absolute error, per element, of sending ``values`` (one tensor) with ``codec``.

    >>> v = torch.tensor([1.0, -0.5, 0.25])
    >>> value_error_bound("float32", v).tolist()
    [0.0, 0.0, 0.0]
    >>> value_error_bound("float16", v).tolist()
    [0.00048828125, 0.000244140625, 0.0001220703125]
    """
    v = values.detach().cpu().to(torch.float64).reshape(-1)
    if codec == "float32":
        return torch.zeros_like(v)
    if codec == "float16":
        if not _fits_float16(v.numpy()):
            return torch.zeros_like(v)
        return torch.clamp(v.abs() * _F16_RELATIVE, min=_F16_SUBNORMAL_ABS)
    if codec in ("int8", "int4_delta"):
        scale = _int_scale(v.numpy(), _INT8_LEVELS) if codec == "int8" else _int4_scale(v.numpy())
        return 0.5 * scale + _F32_ROUNDING * (v.abs() + scale)
    raise ValueError(f"unknown value codec {codec!r}")


def encode_blob(
    sig: SignificantParams,
    *,
    value_codec: ValueCodec = "float16",
    base: Mapping[str, torch.Tensor] | None = None,
    level: int = 3,
) -> bytes:
    """Serialise ``sig`` into one zstd-compressed msgpack blob (format in the module docstring).

    With ``base``, the values sent are ``sig`` values minus ``base[name]`` at the same flat
    positions; both sides must hold identical base weights. The codecs in ``DELTA_CODECS`` need
    ``base``. Raises ``ValueError`` for input that breaks the ``SignificantParams`` invariants
    (unsorted indices, non-finite values, …) or a delta codec without ``base``.

    >>> sl = TensorSlice("w", (2, 3), torch.tensor([0, 4]), torch.tensor([0.5, -1.0]))
    >>> sig = SignificantParams("arch", "lin", (0, 1), 0.5, (sl,))
    >>> blob = encode_blob(sig, value_codec="float32")
    >>> back = decode_blob(blob, arch_id="arch", lineage="lin", shapes={"w": (2, 3)}, num_classes=2)
    >>> back.tensors[0].indices.tolist(), back.tensors[0].values.tolist()
    ([0, 4], [0.5, -1.0])
    """
    if value_codec not in VALUE_CODECS:
        raise ValueError(f"unknown value codec {value_codec!r}")
    if value_codec in DELTA_CODECS and base is None:
        raise ValueError(f"value codec {value_codec!r} codes deltas from the shared base: pass base")
    if not isinstance(sig.arch_id, str) or not isinstance(sig.lineage, str):
        raise ValueError("arch_id and lineage must be str")
    classes = list(sig.classes)
    if not all(_is_int(c) and c >= 0 for c in classes) or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be distinct non-negative ints, got {sig.classes!r}")
    z = sig.z
    if isinstance(z, bool) or not isinstance(z, (int, float)) or not 0.0 < z <= 1.0:
        raise ValueError(f"z must be a number in (0, 1], got {z!r}")
    names = [t.name for t in sig.tensors]
    if len(set(names)) != len(names):
        raise ValueError("tensor names must be unique")
    tensors = [_encode_tensor(t, value_codec, base) for t in sig.tensors]
    doc = {
        "v": FORMAT_VERSION,
        "arch_id": sig.arch_id,
        "lineage": sig.lineage,
        "classes": classes,
        "z": float(z),
        "delta": base is not None,
        "tensors": tensors,
    }
    packed = msgpack.packb(doc, use_bin_type=True)
    cctx = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
    return cctx.compress(packed)


def decode_blob(
    data: bytes,
    *,
    arch_id: str,
    lineage: str,
    shapes: Mapping[str, tuple[int, ...]],
    num_classes: int,
    base: Mapping[str, torch.Tensor] | None = None,
    limits: BlobLimits = BlobLimits(),
    max_decoded_bytes: int | None = None,
) -> SignificantParams:
    """Parse and verify an untrusted blob against the local model; values come back absolute.

    ``arch_id``, ``lineage``, ``shapes`` (parameter name -> exact shape) and ``num_classes``
    describe the local model; ``base`` is needed for delta blobs. zstd may produce at most
    ``max_decoded_bytes`` (default :func:`decoded_size_bound` of the model), and never more than
    ``limits.max_decoded_bytes``. Every defect of the blob, a blob that carries no parameter
    among them, raises :class:`KtRejected` naming what was wrong, chained to the underlying
    error if any; a ``base`` tensor whose size disagrees with ``shapes`` is a caller bug
    (``ValueError``).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise KtRejected(f"blob must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > limits.max_blob_bytes:
        raise KtRejected(f"blob is {len(data)} bytes, over the {limits.max_blob_bytes} cap")
    if max_decoded_bytes is None:
        max_decoded_bytes = decoded_size_bound(shapes, num_classes)
    elif not _is_int(max_decoded_bytes) or max_decoded_bytes <= 0:
        raise ValueError(f"max_decoded_bytes must be a positive int, got {max_decoded_bytes!r}")
    cap = min(max_decoded_bytes, limits.max_decoded_bytes)
    raw = _decompress(data, cap)
    str_cap = max(limits.max_name_len, len(arch_id.encode()), len(lineage.encode()), 16)
    try:
        doc = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            max_bin_len=cap,
            max_str_len=str_cap,
            max_array_len=max(limits.max_tensors, limits.max_ndim, limits.max_classes),
            max_map_len=len(_TENSOR_KEYS) + 1,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise KtRejected(f"blob is not valid msgpack: {_reason(exc)}") from exc
    return _verify(doc, arch_id, lineage, shapes, num_classes, base, limits)


def decoded_size_bound(shapes: Mapping[str, tuple[int, ...]], num_classes: int) -> int:
    """The most decoded (msgpack) bytes any blob this model's decoder accepts can hold.

    Loose on purpose, so that it never refuses a blob the checks would pass: per parameter a
    float32 value and the longest varint position the decoder takes (13 bytes; a real blob
    spends at most 4 1/8); per tensor its name and 512 bytes of keys, headers, shape, ``n`` and
    ``scale``; per class one msgpack int; and 64 KiB for the rest of the top level. The MLP's
    is 6.3 MB, where ``BlobLimits`` alone allows 256 MiB (a frame of 6.3 MB of zeros is 220 bytes).

    >>> decoded_size_bound({"w": (2, 3)}, 2)
    66145
    """
    per_tensor = sum(
        _BOUND_PER_PARAM * math.prod(shape) + _BOUND_PER_TENSOR + len(name.encode())
        for name, shape in shapes.items()
    )
    return per_tensor + _BOUND_PER_CLASS * num_classes + _BOUND_TOP


def bytes_per_param(blob: bytes, sig: SignificantParams) -> float:
    """Wire bytes per transferred parameter (whole blob, headers included)."""
    if sig.count == 0:
        raise ValueError("no parameters transferred")
    return len(blob) / sig.count


def _reason(exc: BaseException) -> str:
    """An exception as ``Type: message``; some (msgpack's FormatError) carry no message at all."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _fits_float16(v: np.ndarray) -> bool:
    with np.errstate(over="ignore"):
        return bool(np.isfinite(v.astype(np.float16)).all())


def _int_scale(v: np.ndarray, levels: int) -> float:
    peak = float(np.abs(v).max()) if v.size else 0.0
    # An all-zero tensor still needs a valid (finite, positive) scale on the wire.
    return peak / levels if peak > 0.0 else 1.0


def _int4_scale(v: np.ndarray) -> float:
    # Never below peak / 7, so no code is clipped and the error bound stays scale / 2.
    rms = math.sqrt(float(np.square(v).mean())) if v.size else 0.0
    return max(_int_scale(v, _INT4_LEVELS), _INT4_MIN_STEP * rms)


def _encode_tensor(
    t: TensorSlice, codec: ValueCodec, base: Mapping[str, torch.Tensor] | None
) -> dict[str, Any]:
    name = t.name
    if not isinstance(name, str) or not name:
        raise ValueError(f"tensor name must be a non-empty str, got {name!r}")
    shape = tuple(t.shape)
    if not all(_is_int(d) and d >= 0 for d in shape):
        raise ValueError(f"tensor {name!r}: shape must be non-negative ints, got {t.shape!r}")
    numel = math.prod(shape)
    idx_t, val_t = t.indices, t.values
    if idx_t.dtype != torch.int64 or idx_t.dim() != 1:
        raise ValueError(f"tensor {name!r}: indices must be 1-D int64")
    if val_t.dtype != torch.float32 or val_t.dim() != 1:
        raise ValueError(f"tensor {name!r}: values must be 1-D float32")
    if idx_t.numel() != val_t.numel():
        raise ValueError(f"tensor {name!r}: {idx_t.numel()} indices but {val_t.numel()} values")
    idx = idx_t.detach().cpu().numpy()
    # float16/float32 round straight from float32 (one rounding either way); the scaled codecs
    # and deltas compute in float64.
    plain = base is None and codec in ("float16", "float32")
    vals = val_t.detach().cpu().numpy() if plain else val_t.detach().cpu().numpy().astype(np.float64)
    if idx.size and (idx[0] < 0 or idx[-1] >= numel or (np.diff(idx) <= 0).any()):
        raise ValueError(f"tensor {name!r}: indices must be strictly increasing in [0, {numel})")
    if not np.isfinite(vals).all():
        raise ValueError(f"tensor {name!r}: values must be finite")
    if base is not None:
        if name not in base:
            raise ValueError(f"tensor {name!r}: missing from base")
        flat = base[name].detach().cpu().reshape(-1)
        if flat.numel() != numel:
            raise ValueError(f"tensor {name!r}: base has {flat.numel()} elements, not {numel}")
        vals = vals - flat.index_select(0, idx_t.cpu()).to(torch.float64).numpy()
        with np.errstate(over="ignore"):
            delta_fits = bool(np.isfinite(vals.astype(np.float32)).all())
        if not delta_fits:
            raise ValueError(f"tensor {name!r}: delta to base is not finite in float32")

    bitmask_len = (numel + 7) // 8
    # Every varint is at least a byte, so from n >= numel / 8 on the bitmask wins unmeasured.
    lengths = None
    if bitmask_len > idx.size:
        gaps = (np.diff(idx, prepend=-1) - 1).astype(np.uint64)
        lengths = _varint_lengths(gaps)
    if lengths is None or bitmask_len <= int(lengths.sum()):
        mask = np.zeros(numel, dtype=bool)
        mask[idx] = True
        enc, idx_bytes = "bitmask", np.packbits(mask, bitorder="little").tobytes()
    else:
        enc, idx_bytes = "varint", _varint_encode(gaps, lengths)
    out: dict[str, Any] = {"name": name, "shape": list(shape), "enc": enc, "idx": idx_bytes,
                           "n": int(idx.size)}
    out.update(_encode_values(vals, codec))
    return out


def _encode_values(v: np.ndarray, codec: ValueCodec) -> dict[str, Any]:
    if codec == "int8":
        scale = _int_scale(v, _INT8_LEVELS)
        q = np.clip(np.rint(v / scale), -_INT8_LEVELS, _INT8_LEVELS).astype(np.int8)
        return {"dtype": "i1", "scale": scale, "val": q.tobytes()}
    if codec == "int4_delta":
        scale = _int4_scale(v)
        q = np.clip(np.rint(v / scale), -_INT4_LEVELS, _INT4_LEVELS).astype(np.int8)
        return {"dtype": "i4", "scale": scale, "val": _nibbles_encode(q)}
    if codec == "float16":
        half = _to_float16(v)
        if half is not None:
            return {"dtype": "f2", "val": half.astype("<f2", copy=False).tobytes()}
    return {"dtype": "f4", "val": v.astype("<f4", copy=False).tobytes()}


def _to_float16(v: np.ndarray) -> np.ndarray | None:
    """``v`` (finite) rounded to float16, or None if a value overflows it."""
    if v.size < _TORCH_WIDEN_MIN or v.dtype != np.float32:
        # (From float64 torch would round through float32, twice; numpy rounds once.)
        with np.errstate(over="ignore"):
            half = v.astype(np.float16)
    else:
        # torch rounds float32 ~10x faster than numpy, with the same round-to-nearest-even.
        half = torch.from_numpy(np.ascontiguousarray(v)).to(torch.float16).numpy()
    # Finite input is non-finite in float16 only by overflow: exponent bits all ones.
    if ((half.view(np.uint16) & 0x7C00) == 0x7C00).any():
        return None
    return half


def _nibbles_encode(q: np.ndarray) -> bytes:
    codes = q.astype(np.uint8) & 0x0F
    if codes.size % 2:
        codes = np.append(codes, np.uint8(0))
    return (codes[0::2] | (codes[1::2] << 4)).tobytes()


def _nibbles_decode(buf: bytes, n: int, name: str) -> np.ndarray:
    """Check ``i4`` value bytes (length, zero padding, no code -8); they come back as uint8."""
    want = (n + 1) // 2
    if len(buf) != want:
        raise KtRejected(f"tensor {name!r}: val is {len(buf)} bytes, expected {want}")
    if n % 2 and buf[-1] >> 4:
        raise KtRejected(f"tensor {name!r}: i4 padding nibble is not zero")
    b = np.frombuffer(buf, dtype=np.uint8)
    if (((b & 0x0F) == 0x08) | ((b & 0xF0) == 0x80)).any():
        raise KtRejected(f"tensor {name!r}: i4 code -8 is outside [-7, 7]")
    return b


def _code_table(dtype: str) -> np.ndarray:
    """What each value byte holds, as float64 codes: one per byte (``i1``), or (low, high) (``i4``)."""
    byte = np.arange(256)
    if dtype == "i1":
        return byte.astype(np.uint8).view(np.int8).astype(np.float64)
    return np.stack([((byte & 0x0F) ^ 8) - 8, ((byte >> 4) ^ 8) - 8], axis=1).astype(np.float64)


# Rebuilding scaled values is a lookup of the byte in ``table * scale``: the same float64
# products ``code * scale`` as multiplying code by code, without splitting nibbles first.
_CODE_TABLES = {dtype: _code_table(dtype) for dtype in _SCALED_DTYPES}


def _widen_float16(buf: bytes) -> np.ndarray:
    """Little-endian float16 wire values as a new float32 array (exact: float32 holds them all)."""
    if len(buf) < 2 * _TORCH_WIDEN_MIN:
        return np.frombuffer(buf, dtype="<f2").astype(np.float32)
    # torch widens ~10x faster than numpy; the bytearray copy gives it a writable buffer (a
    # read-only one draws a warning).
    half = np.frombuffer(bytearray(buf), dtype="<f2")
    if not half.dtype.isnative:
        half = half.astype("=f2")
    return torch.from_numpy(half).to(torch.float32).numpy()


def _varint_lengths(u: np.ndarray) -> np.ndarray:
    lengths = np.ones(u.shape, dtype=np.int64)
    for k in range(1, _VARINT_MAX_BYTES):
        lengths += u >= np.uint64(1 << (7 * k))
    return lengths


def _varint_encode(u: np.ndarray, lengths: np.ndarray) -> bytes:
    ends = np.cumsum(lengths)
    starts = ends - lengths
    out = np.empty(int(ends[-1]) if ends.size else 0, dtype=np.uint8)
    for k in range(int(lengths.max()) if lengths.size else 0):
        sel = lengths > k
        chunk = ((u[sel] >> np.uint64(7 * k)) & np.uint64(0x7F)).astype(np.uint8)
        chunk |= np.where(lengths[sel] > k + 1, 0x80, 0).astype(np.uint8)
        out[starts[sel] + k] = chunk
    return out.tobytes()


def _varint_decode(buf: bytes, n: int, numel: int, name: str) -> np.ndarray:
    b = np.frombuffer(buf, dtype=np.uint8)
    if b.size and b[-1] & 0x80:
        raise KtRejected(f"tensor {name!r}: varint indices end mid-number")
    ends = np.flatnonzero(b < 0x80)
    if ends.size != n:
        raise KtRejected(f"tensor {name!r}: varint indices hold {ends.size} numbers, n says {n}")
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > _VARINT_MAX_BYTES:
        raise KtRejected(f"tensor {name!r}: varint longer than {_VARINT_MAX_BYTES} bytes")
    if ((lengths > 1) & (b[ends] == 0)).any():
        raise KtRejected(f"tensor {name!r}: varint not in shortest form")
    u = np.zeros(n, dtype=np.uint64)
    for k in range(int(lengths.max())):
        sel = lengths > k
        u[sel] |= (b[starts[sel] + k] & 0x7F).astype(np.uint64) << np.uint64(7 * k)
    # Bounded in float64 first so the integer cumsum below cannot wrap around.
    if float(u.sum(dtype=np.float64)) + n >= 2.0**62:
        raise KtRejected(f"tensor {name!r}: varint positions run past numel {numel}")
    positions = (np.cumsum(u + np.uint64(1)) - np.uint64(1)).astype(np.int64)
    if positions[-1] >= numel:
        raise KtRejected(f"tensor {name!r}: varint positions run past numel {numel}")
    return positions


def _bitmask_decode(buf: bytes, n: int, numel: int, name: str) -> np.ndarray:
    want = (numel + 7) // 8
    if len(buf) != want:
        raise KtRejected(f"tensor {name!r}: bitmask is {len(buf)} bytes, expected {want}")
    if numel % 8 and buf[-1] >> (numel % 8):
        raise KtRejected(f"tensor {name!r}: bitmask padding bits are not zero")
    # nonzero over a bool view is several times faster than over the uint8 bits themselves (and
    # than torch's nonzero, or a byte lookup table); it is most of this function's time.
    bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), bitorder="little").view(bool)
    positions = bits.nonzero()[0].astype(np.int64, copy=False)
    if positions.size != n:
        raise KtRejected(f"tensor {name!r}: bitmask has {positions.size} bits set, n says {n}")
    return positions


def _decompress(data: bytes, cap: int) -> bytes:
    """The one zstd frame ``data`` holds; no step ever holds more than ``cap`` decoded bytes."""
    try:
        declared = zstandard.frame_content_size(data)
        has_checksum = zstandard.get_frame_parameters(data).has_checksum
    except zstandard.ZstdError as exc:
        raise KtRejected(f"blob is not a zstd frame: {_reason(exc)}") from exc
    if not has_checksum:
        raise KtRejected("blob's zstd frame carries no checksum")
    if declared > cap:
        raise KtRejected(f"blob declares {declared} decoded bytes, over the {cap} cap")
    dctx = zstandard.ZstdDecompressor()
    if declared > 0:
        # The common case in one call straight into a buffer of the declared size (at most cap;
        # zstd stops where a frame outgrows it): it too checks the checksum, the size and that
        # nothing follows the frame. Whatever it refuses, the path below refuses and names.
        try:
            return dctx.decompress(data, allow_extra_data=False)
        except zstandard.ZstdError:
            pass
    # Measure first, one bounded read at a time, so that the pass below, which keeps all it
    # decodes, is known to fit.
    total = 0
    try:
        reader = dctx.stream_reader(data)
        while chunk := reader.read(_STREAM_CHUNK):
            total += len(chunk)
            if total > cap:
                raise KtRejected(f"blob decodes to more than the {cap} byte cap")
    except zstandard.ZstdError:
        # The frame breaks off within the cap; the pass below decodes the same bytes to the same
        # point and names what is wrong.
        pass
    try:
        # A decompressobj stops at the frame's end, verifies the checksum and tells truncation
        # (no eof) and trailing bytes (unused_data) apart.
        dobj = dctx.decompressobj()
        out = dobj.decompress(data)
    except zstandard.ZstdError as exc:
        raise KtRejected(f"blob's zstd frame is corrupt: {_reason(exc)}") from exc
    if not dobj.eof:
        raise KtRejected("blob's zstd frame is truncated")
    if dobj.unused_data:
        raise KtRejected(f"blob has {len(dobj.unused_data)} bytes after its zstd frame")
    return out


def _keys(d: dict[str, Any], expected: frozenset[str], what: str) -> None:
    keys = set(d)
    if keys != expected:
        missing = sorted(expected - keys)
        unknown = sorted(keys - expected, key=repr)
        parts = [f"missing keys {missing}"] if missing else []
        parts += [f"unknown keys {unknown}"] if unknown else []
        raise KtRejected(f"{what}: {', '.join(parts)}")


def _verify(
    doc: object,
    arch_id: str,
    lineage: str,
    shapes: Mapping[str, tuple[int, ...]],
    num_classes: int,
    base: Mapping[str, torch.Tensor] | None,
    limits: BlobLimits,
) -> SignificantParams:
    if not isinstance(doc, dict):
        raise KtRejected(f"blob top level is {type(doc).__name__}, not a map")
    _keys(doc, _TOP_KEYS, "blob")
    v = doc["v"]
    if not _is_int(v) or v != FORMAT_VERSION:
        raise KtRejected(f"blob format version {v!r} is not {FORMAT_VERSION}")
    if doc["arch_id"] != arch_id:
        raise KtRejected(f"blob arch_id {doc['arch_id']!r} is not the local {arch_id!r}")
    if doc["lineage"] != lineage:
        raise KtRejected(f"blob lineage {doc['lineage']!r} is not the local {lineage!r}")
    classes = doc["classes"]
    if not isinstance(classes, list) or len(classes) > limits.max_classes:
        raise KtRejected(f"blob classes must be a list of at most {limits.max_classes}")
    if not all(_is_int(c) and 0 <= c < num_classes for c in classes):
        raise KtRejected(f"blob classes must be ints in [0, {num_classes}), got {classes!r}")
    if len(set(classes)) != len(classes):
        raise KtRejected(f"blob classes repeat: {classes!r}")
    z = doc["z"]
    if not isinstance(z, float) or not 0.0 < z <= 1.0:
        raise KtRejected(f"blob z must be a float in (0, 1], got {z!r}")
    delta = doc["delta"]
    if not isinstance(delta, bool):
        raise KtRejected(f"blob delta must be a bool, got {delta!r}")
    if delta and base is None:
        raise KtRejected("blob carries deltas but no base weights were given")
    tensors = doc["tensors"]
    if not isinstance(tensors, list) or len(tensors) > limits.max_tensors:
        raise KtRejected(f"blob tensors must be a list of at most {limits.max_tensors}")
    seen: set[str] = set()
    slices = []
    for i, t in enumerate(tensors):
        sl = _verify_tensor(t, i, shapes, base if delta else None, limits)
        if sl.name in seen:
            raise KtRejected(f"tensor {sl.name!r} appears twice")
        seen.add(sl.name)
        slices.append(sl)
    sig = SignificantParams(arch_id, lineage, tuple(classes), z, tuple(slices))
    if sig.count == 0:
        # Nothing to install: a helper built from it would be the target's own copy.
        detail = f": its {len(slices)} tensors are empty" if slices else ""
        raise KtRejected(f"blob carries no parameters{detail}")
    return sig


def _verify_tensor(
    t: object,
    i: int,
    shapes: Mapping[str, tuple[int, ...]],
    base: Mapping[str, torch.Tensor] | None,
    limits: BlobLimits,
) -> TensorSlice:
    if not isinstance(t, dict):
        raise KtRejected(f"tensor #{i} is {type(t).__name__}, not a map")
    name = t.get("name")
    if not isinstance(name, str) or not 0 < len(name) <= limits.max_name_len:
        raise KtRejected(f"tensor #{i}: name must be a str of 1..{limits.max_name_len} chars")
    dtype = t.get("dtype")
    scaled = isinstance(dtype, str) and dtype in _SCALED_DTYPES
    expected = _TENSOR_KEYS | {"scale"} if scaled else _TENSOR_KEYS
    _keys(t, expected, f"tensor {name!r}")
    if name not in shapes:
        raise KtRejected(f"tensor {name!r} is not a parameter of the local model")
    shape = t["shape"]
    if not isinstance(shape, list) or len(shape) > limits.max_ndim:
        raise KtRejected(f"tensor {name!r}: shape must be a list of at most {limits.max_ndim}")
    local = tuple(int(d) for d in shapes[name])
    if not all(_is_int(d) for d in shape) or tuple(shape) != local:
        raise KtRejected(f"tensor {name!r}: shape {shape!r} is not the local {list(local)}")
    numel = math.prod(local)
    n = t["n"]
    if not _is_int(n) or not 0 <= n <= numel:
        raise KtRejected(f"tensor {name!r}: n must be an int in [0, {numel}], got {n!r}")
    idx_bytes, val_bytes = t["idx"], t["val"]
    if not isinstance(idx_bytes, bytes) or not isinstance(val_bytes, bytes):
        raise KtRejected(f"tensor {name!r}: idx and val must be bin")
    enc = t["enc"]
    if enc == "bitmask":
        positions = _bitmask_decode(idx_bytes, n, numel, name)
    elif enc == "varint":
        positions = _varint_decode(idx_bytes, n, numel, name)
    else:
        raise KtRejected(f"tensor {name!r}: unknown index encoding {enc!r}")
    if not isinstance(dtype, str) or (dtype not in _DTYPES and dtype != "i4"):
        raise KtRejected(f"tensor {name!r}: dtype {dtype!r} is not one of {sorted({*_DTYPES, 'i4'})}")
    if dtype == "i4":
        coded = _nibbles_decode(val_bytes, n, name)
    else:
        np_dtype = _DTYPES[dtype]
        if len(val_bytes) != n * np_dtype.itemsize:
            raise KtRejected(
                f"tensor {name!r}: val is {len(val_bytes)} bytes, expected {n * np_dtype.itemsize}"
            )
        if dtype == "f2":
            coded = _widen_float16(val_bytes)
        else:
            # int8 codes stay raw bytes: the rebuild below looks each byte up in a table.
            coded = np.frombuffer(val_bytes, dtype=np.uint8 if scaled else np_dtype)
    scale = 1.0
    if scaled:
        scale = t["scale"]
        if not isinstance(scale, float) or not math.isfinite(scale) or scale <= 0.0:
            raise KtRejected(f"tensor {name!r}: {dtype} scale must be a finite float > 0")
    positions_t = torch.from_numpy(positions)
    base_vals = None
    if base is not None:
        if name not in base:
            raise KtRejected(f"tensor {name!r}: delta given but no base weights for it")
        flat = base[name].detach().cpu().reshape(-1)
        if flat.numel() != numel:
            raise ValueError(f"base[{name!r}] has {flat.numel()} elements, shapes says {numel}")
        # index_select, not flat[idx]: the advanced-indexing path is ~3x slower here. float32 and
        # float64 stay as they are (the float64 sum below widens them exactly).
        gathered = flat.index_select(0, positions_t)
        if gathered.dtype not in (torch.float32, torch.float64):
            gathered = gathered.to(torch.float64)
        base_vals = gathered.numpy()
    if scaled or base_vals is not None:
        # Rebuilt in float64 (code * scale, + base) and rounded to float32 once. (In float32 it
        # would be faster but round up to three times, and could tell finite from overflow apart
        # differently.) Hostile scales or values may overflow here; the check below catches them.
        with np.errstate(over="ignore", invalid="ignore"):
            if scaled:
                rebuilt = np.take(_CODE_TABLES[dtype] * scale, coded, axis=0).reshape(-1)[:n]
            else:
                rebuilt = coded.astype(np.float64)
            if base_vals is not None:
                rebuilt += base_vals
            values = rebuilt.astype(np.float32)
    elif dtype == "f2":
        values = coded  # already a new float32 array
    else:
        values = coded.astype(np.float32)
    if not np.isfinite(values).all():
        raise KtRejected(f"tensor {name!r}: values are not all finite")
    return TensorSlice(name, local, positions_t, torch.from_numpy(values))
