"""An optional test file the server holds for a run over sites' own files (``dataset.server_test``).

Why: with a data contract the sites' files never leave them, so by default the round's quality
comes from federated evaluation on the sites' held-out splits (and under sample-level DP only
where the privacy mode lets a site send unaccounted metrics). A team that does hold a labelled
test file on the server (a public benchmark, data it owns) can have every round scored on it
centrally, at no privacy cost to any site. The file is read once, at the start, under the
contract's declared layout, so a file that breaks the contract stops the run before any site
spends budget on preprocessing or training; it is encoded under the run's current contract at
each evaluation, so a run with federated preprocessing is scored with the federation's
statistics, as the sites train.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fedguard.clients.datasets import DatasetError
from fedguard.clients.local_data import (
    SiteRecords,
    encode_records,
    image_records,
    resolve_data_path,
    table_records,
)
from fedguard.conf.contract import TabularContract, contract_of, declared_contract_of
from fedguard.conf.schema import ConfigError

KEY = "dataset.server_test"


def read_server_test(dataset_cfg: Any) -> SiteRecords | None:
    """The server's test records, checked against the declared contract; None without the key.
    A missing or non-conforming file is a ConfigError naming the key and the problem (the server's
    own file: the full message, rows included, is fine to show)."""
    path = dataset_cfg.get("server_test")
    if path is None:
        return None
    contract = declared_contract_of(dataset_cfg)
    try:
        resolved = resolve_data_path(Path(str(path)), contract)
        if isinstance(contract, TabularContract):
            return table_records(resolved, contract)
        return image_records(resolved, contract)
    except DatasetError as err:
        raise ConfigError(f"{KEY}={path}: {err}") from None


def server_test_examples(records: SiteRecords, dataset_cfg: Any) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs and labels under the run's contract as it stands (the federated statistics
    once preprocessing has written them into ``dataset.statistics``)."""
    return encode_records(records, contract_of(dataset_cfg)), records.labels


def describe(dataset_cfg: Any) -> str:
    """What the summary's ``central_evaluation`` says for a contract dataset."""
    path = dataset_cfg.get("server_test")
    if path is None:
        return "none: the server holds no test data (dataset.contract); see federated_eval_*"
    return f"the server's own test file {Path(str(path)).name} ({KEY}), read under the run's contract"
