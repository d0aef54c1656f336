"""Offline datasets shared by clients (local training) and the server (central test set).

Every loader returns the same :class:`DatasetBundle`: float32 features (images as
N x C x H x W, tables as N x F), int64 labels, the official or seeded test split,
and the facts models need (input shape, class count). Nothing is downloaded.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from fedguard.conf.contract import contract_of
from fedguard.conf.schema import CONTRACT_DATASETS

IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_INSTALL_HINT = (
    "install it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), "
    "or set dataset.root to a folder holding the four Fashion-MNIST IDX files"
)


class DatasetError(RuntimeError):
    """The data cannot be loaded; the message says what is missing and how to fix it."""


class LocalDataError(DatasetError):
    """Data that loads but cannot be trained on (empty, wrong size, labels out of range, NaN).

    ``public`` is the reason the server hears. Where the message points at single records (a row,
    an image file, how many records are bad), which record it is is itself data about the site's
    records, and the server chooses the contract they are checked against: the server then hears the
    column and the kind of problem, and the site's log keeps the full message.
    """

    def __init__(self, message: str, *, public: str | None = None) -> None:
        super().__init__(message)
        self.public = public or message


# What each dataset's examples must look like, so a site's own copy that differs is refused
# with a reason instead of failing later inside the model (shape) or the loss (labels).
IMAGE_SHAPES = {"fashion_mnist": (1, 28, 28), "digits": (1, 8, 8)}
TABULAR_FEATURES = {"breast_cancer": 30}
CLASS_COUNTS = {"fashion_mnist": 10, "digits": 10, "breast_cancer": 2}


def expected_layout(dataset_cfg: DictConfig) -> tuple[tuple[int, ...], int]:
    """(input shape of one example, number of classes) the configured dataset must have."""
    name = dataset_cfg.name
    if name in CONTRACT_DATASETS:
        contract = contract_of(dataset_cfg)
        return contract.input_shape, contract.num_classes
    if name in IMAGE_SHAPES:
        return IMAGE_SHAPES[name], CLASS_COUNTS[name]
    if name in TABULAR_FEATURES:
        return (TABULAR_FEATURES[name],), CLASS_COUNTS[name]
    if name == "synthetic":
        return (int(dataset_cfg.num_features),), int(dataset_cfg.num_classes)
    raise DatasetError(f"unknown dataset {name!r}")


def check_examples(features: np.ndarray, labels: np.ndarray, shape: tuple[int, ...], num_classes: int, where: str) -> None:
    """Refuse examples no model of this dataset can train on; ``where`` names them in the message."""
    if len(features) == 0:
        raise LocalDataError(f"{where} holds no examples")
    if len(features) != len(labels):
        raise LocalDataError(f"{where} has {len(features)} examples but {len(labels)} labels")
    if tuple(features.shape[1:]) != shape:
        got = "x".join(map(str, features.shape[1:]))
        raise LocalDataError(f"{where}: examples are {got}, the dataset needs {'x'.join(map(str, shape))}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise LocalDataError(f"{where}: labels must be one integer per example; found {labels.dtype}{labels.shape}")
    out_of_range = int(np.count_nonzero((labels < 0) | (labels >= num_classes)))
    if out_of_range:
        raise LocalDataError(f"{where}: {out_of_range} label(s) outside 0..{num_classes - 1}",
                             public=f"{where}: labels outside 0..{num_classes - 1}")
    if np.issubdtype(features.dtype, np.floating) and not np.all(np.isfinite(features)):
        raise LocalDataError(f"{where}: {int(np.count_nonzero(~np.isfinite(features)))} feature values are NaN or infinite",
                             public=f"{where}: feature values that are NaN or infinite")


@dataclass(frozen=True)
class Normalization:
    """How raw inputs become what the models see: ``(raw * scale - mean) / std``.

    Kept next to the loaders so an exported model (server/export.py) applies exactly the
    transform training used. ``mean``/``std`` hold one value (images: one statistic over all
    pixels) or one per column (tables), always from the training split only.
    """

    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    raw_range: tuple[float, float] | None = None  # images: the raw pixel range (digits 0..16)

    @property
    def per_feature(self) -> bool:
        return len(self.mean) > 1

    def apply(self, raw: np.ndarray) -> np.ndarray:
        mean = np.asarray(self.mean, dtype=np.float64)
        std = np.asarray(self.std, dtype=np.float64)
        return ((np.asarray(raw, dtype=np.float64) * self.scale - mean) / std).astype(np.float32)


@dataclass(frozen=True)
class DatasetBundle:
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    @property
    def is_image(self) -> bool:
        return self.train_x.ndim == 4


def _global_stats(train: np.ndarray) -> tuple[float, float]:
    """Statistics of the training split only, so the test set stays unseen."""
    return float(train.mean()), float(train.std()) or 1.0


def _column_stats(train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std[std == 0] = 1.0
    return mean, std


def _standardize(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = _global_stats(train)
    return ((train - mean) / std).astype(np.float32), ((test - mean) / std).astype(np.float32)


def _standardize_columns(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = _column_stats(train)
    return ((train - mean) / std).astype(np.float32), ((test - mean) / std).astype(np.float32)


def _find_idx_file(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise DatasetError(f"Fashion-MNIST file {stem}[.gz] not found in {root}: {FASHION_MNIST_INSTALL_HINT}")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST family's format), gzip-compressed or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 8:
        raise DatasetError(f"{path} is too short to be an IDX file")
    magic, count = struct.unpack(">II", data[:8])
    if magic == IDX_LABELS_MAGIC:
        header, shape = 8, (count,)
    elif magic == IDX_IMAGES_MAGIC:
        rows, cols = struct.unpack(">II", data[8:16])
        header, shape = 16, (count, rows, cols)
    else:
        raise DatasetError(f"{path} has IDX magic {magic}, expected {IDX_IMAGES_MAGIC} or {IDX_LABELS_MAGIC}")
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise DatasetError(f"{path} holds {len(data) - header} bytes of data, its header promises {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def check_dataset_files(dataset_cfg: DictConfig) -> None:
    """Raise DatasetError if files the dataset needs are missing, without reading them.

    Why: the simulation engine takes many seconds to start and loads data only inside it;
    a wrong ``dataset.root`` should be one message before any of that.
    """
    if dataset_cfg.name == "fashion_mnist":
        folder = _fashion_mnist_folder(dataset_cfg.root)
        for stem in FASHION_MNIST_FILES.values():
            _find_idx_file(folder, stem)


def _fashion_mnist_folder(root: str | None) -> Path:
    if not root:
        raise DatasetError(f"dataset.root is not set for Fashion-MNIST: {FASHION_MNIST_INSTALL_HINT}")
    folder = Path(root)
    if not folder.is_dir():
        raise DatasetError(f"Fashion-MNIST folder {folder} does not exist: {FASHION_MNIST_INSTALL_HINT}")
    return folder


def _load_fashion_mnist(root: str | None) -> DatasetBundle:
    folder = _fashion_mnist_folder(root)
    arrays = {key: read_idx(_find_idx_file(folder, stem)) for key, stem in FASHION_MNIST_FILES.items()}
    image_shape = IMAGE_SHAPES["fashion_mnist"][1:]
    for split in ("train", "test"):  # before scaling: an empty split has no mean to scale by
        check_examples(arrays[f"{split}_images"], arrays[f"{split}_labels"], image_shape, CLASS_COUNTS["fashion_mnist"],
                       f"Fashion-MNIST {split} split in {folder}")
    train_x, test_x = _standardize(
        arrays["train_images"].astype(np.float32) / 255.0, arrays["test_images"].astype(np.float32) / 255.0
    )
    return DatasetBundle(
        train_x=train_x[:, None, :, :],
        train_y=arrays["train_labels"].astype(np.int64),
        test_x=test_x[:, None, :, :],
        test_y=arrays["test_labels"].astype(np.int64),
        num_classes=10,
    )


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int):
    from sklearn.model_selection import train_test_split  # on first use: sklearn costs ~1 s to import

    return train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)


def _load_digits(test_fraction: float, seed: int) -> DatasetBundle:
    from sklearn.datasets import load_digits

    digits = load_digits()
    train_x, test_x, train_y, test_y = _split(digits.images.astype(np.float32), digits.target, test_fraction, seed)
    train_x, test_x = _standardize(train_x, test_x)
    return DatasetBundle(train_x[:, None], train_y.astype(np.int64), test_x[:, None], test_y.astype(np.int64), 10)


def _load_breast_cancer(test_fraction: float, seed: int) -> DatasetBundle:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    train_x, test_x, train_y, test_y = _split(data.data.astype(np.float64), data.target, test_fraction, seed)
    train_x, test_x = _standardize_columns(train_x, test_x)
    return DatasetBundle(train_x, train_y.astype(np.int64), test_x, test_y.astype(np.int64), 2)


def _synthetic_raw(
    num_samples: int, num_features: int, num_classes: int, separation: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, num_features)) * separation / np.sqrt(num_features)
    labels = rng.integers(0, num_classes, size=num_samples)
    return centres[labels] + rng.normal(size=(num_samples, num_features)) / np.sqrt(num_features), labels


def _make_synthetic(
    num_samples: int, num_features: int, num_classes: int, separation: float, test_fraction: float, seed: int
) -> DatasetBundle:
    """Gaussian clusters around random class centres; separation sets how hard the task is."""
    features, labels = _synthetic_raw(num_samples, num_features, num_classes, separation, seed)
    train_x, test_x, train_y, test_y = _split(features, labels, test_fraction, seed)
    train_x, test_x = _standardize_columns(train_x, test_x)
    return DatasetBundle(train_x, train_y.astype(np.int64), test_x, test_y.astype(np.int64), num_classes)


@lru_cache(maxsize=4)
def _load_cached(key: tuple) -> DatasetBundle:
    name, root, test_fraction, seed, num_samples, num_features, num_classes, separation = key
    if name == "fashion_mnist":
        return _load_fashion_mnist(root)
    if name == "digits":
        return _load_digits(test_fraction, seed)
    if name == "breast_cancer":
        return _load_breast_cancer(test_fraction, seed)
    if name == "synthetic":
        return _make_synthetic(num_samples, num_features, num_classes, separation, test_fraction, seed)
    raise DatasetError(f"unknown dataset {name!r}")


def load_dataset(dataset_cfg: DictConfig, seed: int, root_override: str | None = None) -> DatasetBundle:
    """Load (once per process) the dataset a config names; ``root_override`` comes from a site's node config."""
    if dataset_cfg.name in CONTRACT_DATASETS:
        raise DatasetError(f"dataset={dataset_cfg.name} is each site's own files (its --data), described by "
                           "dataset.contract; there is no shared copy to load")
    key = (
        dataset_cfg.name,
        root_override or dataset_cfg.root,
        float(dataset_cfg.test_fraction),
        int(seed),
        int(dataset_cfg.num_samples),
        int(dataset_cfg.num_features),
        int(dataset_cfg.num_classes),
        float(dataset_cfg.class_separation),
    )
    bundle = _load_cached(key)
    shape, num_classes = expected_layout(dataset_cfg)
    check_examples(bundle.train_x, bundle.train_y, shape, num_classes, f"{dataset_cfg.name} training split")
    check_examples(bundle.test_x, bundle.test_y, shape, num_classes, f"{dataset_cfg.name} test split")
    return bundle


def raw_test_split(dataset_cfg: DictConfig, seed: int) -> tuple[np.ndarray, np.ndarray, Normalization]:
    """The test split *before* standardization, its labels, and the transform training applied.

    An exported model takes raw inputs (what a user has: pixel values, measured columns), so
    its check must feed raw test data and compare with the model fed the standardized copy;
    reconstructing raw inputs by inverting the transform would hide a wrong transform.
    """
    name = dataset_cfg.name
    if name == "fashion_mnist":
        folder = Path(dataset_cfg.root or "")
        train = read_idx(_find_idx_file(folder, FASHION_MNIST_FILES["train_images"])).astype(np.float32) / 255.0
        mean, std = _global_stats(train)
        test_x = read_idx(_find_idx_file(folder, FASHION_MNIST_FILES["test_images"]))[:, None].astype(np.float32)
        test_y = read_idx(_find_idx_file(folder, FASHION_MNIST_FILES["test_labels"])).astype(np.int64)
        return test_x, test_y, Normalization(1.0 / 255.0, (mean,), (std,), (0.0, 255.0))
    test_fraction = float(dataset_cfg.test_fraction)
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        train_x, test_x, _, test_y = _split(digits.images.astype(np.float32), digits.target, test_fraction, seed)
        mean, std = _global_stats(train_x)
        return test_x[:, None], test_y.astype(np.int64), Normalization(1.0, (mean,), (std,), (0.0, 16.0))
    if name == "breast_cancer":
        from sklearn.datasets import load_breast_cancer

        data = load_breast_cancer()
        train_x, test_x, _, test_y = _split(data.data.astype(np.float64), data.target, test_fraction, seed)
    elif name == "synthetic":
        features, labels = _synthetic_raw(int(dataset_cfg.num_samples), int(dataset_cfg.num_features),
                                          int(dataset_cfg.num_classes), float(dataset_cfg.class_separation), seed)
        train_x, test_x, _, test_y = _split(features, labels, test_fraction, seed)
    else:
        raise DatasetError(f"unknown dataset {name!r}")
    mean, std = _column_stats(train_x)
    norm = Normalization(1.0, tuple(float(v) for v in mean), tuple(float(v) for v in std))
    return test_x, test_y.astype(np.int64), norm


def feature_names(dataset_cfg: DictConfig) -> tuple[str, ...] | None:
    """Column names where the data set has them (a served model accepts rows keyed by name)."""
    if dataset_cfg.name == "breast_cancer":
        from sklearn.datasets import load_breast_cancer

        return tuple(str(name) for name in load_breast_cancer().feature_names)
    return None


CLASS_NAMES = {
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"),
    "digits": tuple(str(d) for d in range(10)),
    "breast_cancer": ("malignant", "benign"),
}
