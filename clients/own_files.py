"""A site's own files as the training set and the statistics input of a run with a data contract.

Both the training request and the federated-preprocessing request read the same rows the
same way: the contract's records and a seeded shuffle into training and validation rows. The
site's per-data spend (clients/data_spend.py) is named by a fingerprint of the site's files
themselves (``files_fingerprint``), so the statistics release and every training round on
those records are charged to one account, whatever seed, split, contract or scaling a run picks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from fedguard.clients.contract_pin import check_contract
from fedguard.clients.datasets import LocalDataError, Normalization
from fedguard.clients.local_data import SiteRecords, encode_records, files_fingerprint, read_site_records
from fedguard.clients.site import DATA_KEY, SiteConfigError, SiteSettings
from fedguard.conf.contract import ImageContract, contract_of, declared_contract_of


@dataclass(frozen=True)
class OwnSplit:
    """A site's records split into training and validation rows, and the id of its files."""

    records: SiteRecords
    train: np.ndarray
    validation: np.ndarray
    fingerprint: str

    @property
    def train_records(self) -> SiteRecords:
        return self.records.take(self.train)


def own_split(cfg: DictConfig, site: SiteSettings) -> OwnSplit:
    """Read and check the site's files, split them (seeded by the run), fingerprint the files."""
    if not site.data:
        raise SiteConfigError(f"dataset={cfg.dataset.name} trains on each site's own files: start this site "
                              f"with `fedguard client --data PATH` (node config '{DATA_KEY}')")
    check_contract(cfg.dataset, site)  # before the files are read: a contract it did not pin learns nothing
    declared = declared_contract_of(cfg.dataset)
    records = read_site_records(site.data, declared)
    labels = records.labels
    order = np.random.default_rng(cfg.seed).permutation(len(labels))
    held_out = int(len(labels) * float(cfg.dataset.validation_fraction))
    if len(labels) - held_out < 1:
        raise LocalDataError(f"{site.data}: {len(labels)} example(s) leave none for training after the "
                             f"validation split (dataset.validation_fraction={cfg.dataset.validation_fraction})")
    train, validation = order[held_out:], order[:held_out]
    return OwnSplit(records, train, validation, files_fingerprint(Path(site.data)))


def own_examples(cfg: DictConfig, site: SiteSettings) -> tuple[np.ndarray, np.ndarray, OwnSplit]:
    """All the site's model inputs under the run's scaling (federated statistics where the server
    computed them, the declared constants otherwise), their labels, and the split."""
    split = own_split(cfg, site)
    return encode_records(split.records, contract_of(cfg.dataset)), split.records.labels, split


def raw_own_examples(dataset_cfg: DictConfig, data: str) -> tuple[np.ndarray, np.ndarray, Normalization, tuple[str, ...]]:
    """A site's files as an exported model takes them (``fedguard export --data``): raw inputs (numeric
    columns as measured and categorical ones one-hot, in contract order; images as 0..255 pixels), label
    indices, the Normalization that turns them into what training fed the model (the contract's
    scaling, or the federation's statistics where the run computed them) and the input names."""
    contract = contract_of(dataset_cfg)
    records = read_site_records(data, declared_contract_of(dataset_cfg))
    if isinstance(contract, ImageContract):
        norm = Normalization(1.0 / 255.0, (contract.mean,), (contract.std,), (0.0, 255.0))
        return records.pixels.astype(np.float32), records.labels, norm, ()
    blocks, names, mean, std = [], [], [], []
    numeric, coded = iter(records.numeric.T), iter(records.codes)
    for feature in contract.features:
        if feature.kind == "numeric":
            blocks.append(next(numeric)[:, None])
            names.append(feature.name)
            mean.append(feature.center)
            std.append(feature.scale)
        else:  # one-hot columns pass through: mean 0, std 1
            blocks.append(np.eye(feature.width)[next(coded)])
            names += [f"{feature.name}={category}" for category in feature.categories]
            mean += [0.0] * feature.width
            std += [1.0] * feature.width
    raw = np.concatenate(blocks, axis=1).astype(np.float32)
    return raw, records.labels, Normalization(1.0, tuple(mean), tuple(std)), tuple(names)
