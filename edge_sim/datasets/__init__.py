"""Offline data sets for the simulator: images (Fashion-MNIST, MNIST, EMNIST) and NSL-KDD.

Every loader returns ``(x, y)``: ``x`` float32 of shape (N, D) with values in [0, 1], ``y`` int64
of shape (N,). Images have D = 784 (upright 28x28, row-major); NSL-KDD, real or synthetic, has
D = 122. Nothing is downloaded; a missing file raises ``DatasetNotFound`` (a FileNotFoundError)
whose message says where to get it. A scenario's ``dataset``, a built-in or a table naming the
user's own files (npz, idx, csv, nslkdd), is read by ``edge_sim.datasets.sources``.
"""

from edge_sim.datasets.common import DatasetNotFound, class_subset, stratified_sample
from edge_sim.datasets.idx import load_idx_images, read_idx, write_idx
from edge_sim.datasets.images import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ROOT,
    load_emnist,
    load_fashion_mnist,
    load_mnist_5k,
    load_mnist_idx,
)
from edge_sim.datasets.nslkdd import CLASS_NAMES as NSLKDD_CLASSES
from edge_sim.datasets.nslkdd import FEATURE_NAMES as NSLKDD_FEATURES
from edge_sim.datasets.nslkdd import load_nslkdd
from edge_sim.datasets.synthetic import make_synthetic_nslkdd

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ROOT",
    "NSLKDD_CLASSES",
    "NSLKDD_FEATURES",
    "DatasetNotFound",
    "class_subset",
    "load_emnist",
    "load_fashion_mnist",
    "load_idx_images",
    "load_mnist_5k",
    "load_mnist_idx",
    "load_nslkdd",
    "make_synthetic_nslkdd",
    "read_idx",
    "stratified_sample",
    "write_idx",
]
