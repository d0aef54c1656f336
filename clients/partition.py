"""Deterministic split of a training set across clients, using flwr-datasets' partitioners.

flwr-datasets works on Hugging Face ``Dataset`` objects; we hand it an in-memory
table of labels and row indices (no download), and read back each partition's
indices, so the same partitioners serve every dataset fedguard loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from omegaconf import DictConfig


class PartitionError(ValueError):
    """The data cannot be split as configured (e.g. too few rows for the clients)."""


@dataclass(frozen=True)
class ClientSplit:
    train_indices: np.ndarray
    validation_indices: np.ndarray


def _build_partitioner(name: str, num_partitions: int, alpha: float, min_size: int, shards: int, seed: int):
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, ShardPartitioner

    if name == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if name == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min_size,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    if name == "shards":
        return ShardPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_shards_per_partition=shards,
            shuffle=True,
            seed=seed,
        )
    raise PartitionError(f"unknown partition {name!r}")


@lru_cache(maxsize=4)
def _partitioner_cached(
    labels_bytes: bytes, name: str, num_partitions: int, alpha: float, min_size: int, shards: int, seed: int
):
    """The partitioner over these labels, built once per process; partitions are cut from it on demand.

    Why on demand: a virtual client needs only its own partition, and cutting all of them
    (a Hugging Face shard or select per partition, ~15 ms each) costs minutes per worker
    process at 10,000 clients."""
    from datasets import Dataset

    labels = np.frombuffer(labels_bytes, dtype=np.int64)
    if len(labels) < num_partitions:
        raise PartitionError(
            f"{len(labels)} training rows cannot be split across simulation.num_clients={num_partitions} clients"
        )
    # IidPartitioner cuts contiguous blocks: shuffle the row order first so blocks are random.
    order = np.random.default_rng(seed).permutation(len(labels))
    # Arrow format: the partitioners read the label column with ``np.array(dataset["label"])``, which
    # for the default format walks a lazy column row by row (~4 s per 20,000 rows, every process that
    # partitions); an Arrow column converts in one step. The partitions are the same either way
    # (tests/test_data.py::test_arrow_table_gives_the_same_partitions).
    table = Dataset.from_dict({"label": labels[order], "row": order}).with_format("arrow")
    partitioner = _build_partitioner(name, num_partitions, alpha, min_size, shards, seed)
    partitioner.dataset = table
    return partitioner


def _partitioner(labels: np.ndarray, partition_cfg: DictConfig, num_partitions: int, seed: int):
    return _partitioner_cached(
        np.ascontiguousarray(labels, dtype=np.int64).tobytes(),
        partition_cfg.name,
        int(num_partitions),
        float(partition_cfg.alpha),
        int(partition_cfg.min_partition_size),
        int(partition_cfg.shards_per_client),
        int(seed),
    )


def _cut(partitioner, partition_id: int, name: str, num_partitions: int) -> np.ndarray:
    try:
        return np.asarray(partitioner.load_partition(partition_id)["row"], dtype=np.int64)
    except ValueError as err:  # flwr-datasets raises ValueError for impossible splits
        raise PartitionError(f"partition={name} failed for {num_partitions} clients: {err}") from err


def partition_of(
    labels: np.ndarray, partition_cfg: DictConfig, num_partitions: int, seed: int, partition_id: int
) -> np.ndarray:
    """Row indices of one client's share: the same rows as ``partition_indices(...)[partition_id]``."""
    if not 0 <= partition_id < num_partitions:
        raise PartitionError(f"partition id {partition_id} is outside 0..{num_partitions - 1}")
    partitioner = _partitioner(labels, partition_cfg, num_partitions, seed)
    return _cut(partitioner, partition_id, partition_cfg.name, num_partitions)


def partition_indices(labels: np.ndarray, partition_cfg: DictConfig, num_partitions: int, seed: int) -> list[np.ndarray]:
    """Row indices of each client's share of ``labels``; the same seed gives the same split."""
    partitioner = _partitioner(labels, partition_cfg, num_partitions, seed)
    return [_cut(partitioner, i, partition_cfg.name, num_partitions) for i in range(num_partitions)]


def split_train_validation(indices: np.ndarray, validation_fraction: float, seed: int) -> ClientSplit:
    """Hold out a local validation split; with fewer than two rows everything is training data."""
    shuffled = np.random.default_rng(seed).permutation(indices)
    num_validation = int(len(shuffled) * validation_fraction) if len(shuffled) >= 2 else 0
    return ClientSplit(train_indices=shuffled[num_validation:], validation_indices=shuffled[:num_validation])
