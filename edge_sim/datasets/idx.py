"""IDX files (the MNIST family's format), plain or gzipped.

Layout: two zero bytes, a type code, the number of dimensions ``d``, then ``d`` big-endian uint32
sizes, then the values in C order, big-endian. Gzip is recognised by its magic bytes, not by the
file name.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

# IDX type code -> big-endian numpy dtype.
_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES: dict[tuple[str, int], int] = {(dt.kind, dt.itemsize): code for code, dt in _DTYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """The array stored in an IDX file, in native byte order, with the file's shape and dtype.

    Raises ValueError naming the file when the magic, the type code, the header or the data length
    is wrong (a truncated download is caught here, not later as a reshape error).
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{path}: corrupt or truncated gzip stream ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (magic {raw[:4].hex() or 'missing'}, want 0000xxxx)")
    code, ndim = raw[2], raw[3]
    if code not in _DTYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02X}")
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares zero dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, want {header})")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _DTYPES[code]
    want = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != want:
        raise ValueError(f"{path}: {len(raw)} bytes but shape {dims} of {dtype.name} needs {want}")
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    # astype copies into a writable, native-endian array (frombuffer's view is read-only).
    return data.astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write ``array`` as an IDX file; gzipped when ``path`` ends in ``.gz``.

    Accepts uint8, int8, int16, int32, float32 and float64 arrays of at least one dimension.
    """
    array = np.asarray(array)
    code = _CODES.get((array.dtype.kind, array.dtype.itemsize))
    if code is None or array.ndim == 0:
        raise ValueError(f"IDX cannot hold a {array.ndim}-d {array.dtype} array")
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    raw = header + np.ascontiguousarray(array, dtype=_DTYPES[code]).tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def load_idx_images(
    images_path: str | os.PathLike[str],
    labels_path: str | os.PathLike[str],
    *,
    transpose: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels from a pair of IDX files.

    Returns ``x`` float32 of shape (N, H*W), pixels scaled to [0, 1] and flattened row-major from
    upright images (``x.reshape(-1, 1, H, W)`` for a CNN), and ``y`` int64 of shape (N,).
    ``transpose=True`` swaps each image's rows and columns first, which EMNIST needs: it stores
    its images transposed.
    """
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"{images_path}: want a 3-d uint8 image array, got {images.ndim}-d {images.dtype}"
        )
    if labels.ndim != 1:
        raise ValueError(f"{labels_path}: want 1-d labels, got shape {labels.shape}")
    if len(labels) != len(images):
        raise ValueError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    if transpose:
        images = images.transpose(0, 2, 1)
    x = images.reshape(len(images), -1).astype(np.float32)
    x /= 255.0
    return x, labels.astype(np.int64)
