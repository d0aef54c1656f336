"""Datasets load offline; partitions are deterministic, complete and skewed as configured."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from fedguard.clients.datasets import DatasetError, load_dataset, read_idx
from fedguard.clients.partition import PartitionError, partition_indices, partition_of, split_train_validation
from fedguard.conf import compose_config

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")


def _write_idx(path: Path, array: np.ndarray) -> None:
    magic = 2051 if array.ndim == 3 else 2049
    header = struct.pack(">II", magic, array.shape[0]) + b"".join(struct.pack(">I", d) for d in array.shape[1:])
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_idx_reader_round_trips(tmp_path):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    labels = np.array([1, 0, 9], dtype=np.uint8)
    _write_idx(tmp_path / "img.gz", images)
    _write_idx(tmp_path / "lbl.gz", labels)
    assert np.array_equal(read_idx(tmp_path / "img.gz"), images)
    assert np.array_equal(read_idx(tmp_path / "lbl.gz"), labels)


def test_truncated_idx_file_is_refused(tmp_path):
    path = tmp_path / "bad.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(struct.pack(">IIII", 2051, 10, 28, 28) + b"\x00" * 100)
    with pytest.raises(DatasetError, match="promises"):
        read_idx(path)


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    cfg = compose_config(["dataset=fashion_mnist", f"dataset.root={tmp_path}"])
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        load_dataset(cfg.dataset, cfg.seed)


@pytest.mark.skipif(not FASHION_ROOT.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_shapes():
    cfg = compose_config(["dataset=fashion_mnist"])
    bundle = load_dataset(cfg.dataset, cfg.seed)
    assert bundle.train_x.shape == (60000, 1, 28, 28)
    assert bundle.test_x.shape == (10000, 1, 28, 28)
    assert bundle.train_x.dtype == np.float32
    assert set(np.unique(bundle.train_y)) == set(range(10))
    assert abs(float(bundle.train_x.mean())) < 1e-3  # standardized on the training split


@pytest.mark.parametrize("name", ["digits", "breast_cancer", "synthetic"])
def test_bundled_datasets_load(name):
    cfg = compose_config([f"dataset={name}"])
    bundle = load_dataset(cfg.dataset, cfg.seed)
    assert len(bundle.train_y) > len(bundle.test_y) > 0
    assert bundle.train_x.dtype == np.float32 and bundle.train_y.dtype == np.int64
    assert set(np.unique(bundle.test_y)) <= set(range(bundle.num_classes))


def _labels(num: int = 5000, classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, size=num).astype(np.int64)


@pytest.mark.parametrize("name", ["iid", "dirichlet", "shards"])
def test_one_clients_partition_is_its_share_of_the_whole_split(name):
    """A virtual client cuts only its own partition (10,000 clients: not all of them); the same rows."""
    cfg = compose_config([f"partition={name}"])
    labels = _labels(seed=3)
    whole = partition_indices(labels, cfg.partition, 10, seed=5)
    for partition_id in (9, 0, 4):  # any order: the partitioner is shared, cut on demand
        assert np.array_equal(partition_of(labels.copy(), cfg.partition, 10, 5, partition_id), whole[partition_id])
    with pytest.raises(PartitionError):
        partition_of(labels, cfg.partition, 10, 5, 10)


@pytest.mark.parametrize("name", ["iid", "dirichlet", "shards"])
def test_partitions_are_disjoint_complete_and_deterministic(name):
    cfg = compose_config([f"partition={name}"])
    labels = _labels()
    parts = partition_indices(labels, cfg.partition, 10, seed=7)
    again = partition_indices(labels.copy(), cfg.partition, 10, seed=7)
    joined = np.concatenate(parts)
    assert len(parts) == 10
    assert len(np.unique(joined)) == len(joined)  # disjoint
    if name != "shards":  # shards may drop an incomplete last shard
        assert len(joined) == len(labels)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other_seed = partition_indices(labels, cfg.partition, 10, seed=8)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other_seed))


def test_iid_partition_sizes_are_balanced():
    cfg = compose_config(["partition=iid"])
    sizes = [len(p) for p in partition_indices(_labels(5003), cfg.partition, 10, seed=1)]
    assert max(sizes) - min(sizes) <= 1


def _label_skew(parts: list[np.ndarray], labels: np.ndarray, classes: int) -> float:
    """Mean total-variation distance between each client's label mix and the global one."""
    overall = np.bincount(labels, minlength=classes) / len(labels)
    distances = []
    for part in parts:
        mix = np.bincount(labels[part], minlength=classes) / max(len(part), 1)
        distances.append(0.5 * np.abs(mix - overall).sum())
    return float(np.mean(distances))


def test_dirichlet_skew_grows_as_alpha_shrinks():
    labels = _labels(20000)
    skews = []
    for alpha in (100.0, 1.0, 0.1):
        cfg = compose_config(["partition=dirichlet", f"partition.alpha={alpha}", "partition.min_partition_size=0"])
        skews.append(_label_skew(partition_indices(labels, cfg.partition, 20, seed=3), labels, 10))
    assert skews[0] < skews[1] < skews[2]
    assert skews[0] < 0.1 and skews[2] > 0.5


def test_shards_give_each_client_few_labels():
    cfg = compose_config(["partition=shards", "partition.shards_per_client=2"])
    labels = np.sort(_labels(2000))
    parts = partition_indices(labels, cfg.partition, 10, seed=0)
    assert max(len(np.unique(labels[p])) for p in parts) <= 4


def test_more_clients_than_rows_is_a_clear_error():
    cfg = compose_config(["partition=iid"])
    with pytest.raises(PartitionError, match="num_clients"):
        partition_indices(_labels(5), cfg.partition, 10, seed=0)


def test_local_validation_split():
    split = split_train_validation(np.arange(100), 0.1, seed=0)
    assert len(split.validation_indices) == 10 and len(split.train_indices) == 90
    assert not set(split.validation_indices) & set(split.train_indices)
    single = split_train_validation(np.array([4]), 0.1, seed=0)
    assert list(single.train_indices) == [4] and len(single.validation_indices) == 0


@pytest.mark.parametrize("overrides", [["partition=iid"], ["partition=shards", "partition.shards_per_client=2"],
                                       ["partition=dirichlet", "partition.alpha=0.5", "partition.min_partition_size=0"]])
def test_arrow_table_gives_the_same_partitions(overrides):
    """clients/partition.py hands flwr-datasets an Arrow-format table (fast column reads); the rows of
    each partition must be those the partitioner cuts from a plain table, the format it documents."""
    from datasets import Dataset

    from fedguard.clients import partition as module

    cfg = compose_config(overrides)
    labels, seed, clients = _labels(3000), 5, 12
    order = np.random.default_rng(seed).permutation(len(labels))
    plain = module._build_partitioner(cfg.partition.name, clients, float(cfg.partition.alpha),
                                      int(cfg.partition.min_partition_size), int(cfg.partition.shards_per_client), seed)
    plain.dataset = Dataset.from_dict({"label": labels[order], "row": order})
    expected = [np.asarray(plain.load_partition(i)["row"], dtype=np.int64) for i in range(clients)]
    actual = partition_indices(labels, cfg.partition, clients, seed=seed)
    assert len(actual) == clients
    for mine, theirs in zip(actual, expected, strict=True):
        np.testing.assert_array_equal(mine, theirs)
