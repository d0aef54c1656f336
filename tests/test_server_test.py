"""dataset.server_test: a labelled file the server holds, scoring a run over sites' own files
centrally. Read once under the declared contract (a bad file stops the run before any site
spends), encoded under the run's federated statistics, and refused where it means nothing."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedguard.conf import compose_config
from fedguard.conf.schema import ConfigError
from fedguard.server.server_test import describe, read_server_test, server_test_examples


@pytest.fixture(scope="module")
def tabular_cfg():
    return compose_config(["dataset=tabular", "model=mlp"])


def _rows(cfg, n: int) -> pd.DataFrame:
    """n rows in the shipped wine contract's columns: numeric values spread over each declared
    range, colours and cultivars in turn (no scikit-learn import: this is an inner-loop test)."""
    contract = cfg.dataset.contract
    frame = {}
    for f in contract.features:
        if f.get("type") == "categorical":
            frame[f.name] = [f.categories[i % len(f.categories)] for i in range(n)]
        else:
            frame[f.name] = np.linspace(f.low, f.high, n)
    frame[contract.label] = [contract.classes[i % len(contract.classes)] for i in range(n)]
    return pd.DataFrame(frame)


def test_without_the_key_there_is_no_server_test_and_the_summary_says_so(tabular_cfg):
    assert read_server_test(tabular_cfg.dataset) is None
    assert describe(tabular_cfg.dataset).startswith("none: the server holds no test data")


def test_the_file_is_encoded_under_the_runs_federated_statistics(tabular_cfg, tmp_path):
    rows = _rows(tabular_cfg, 18)
    rows.to_csv(tmp_path / "held-out.csv", index=False)
    cfg = tabular_cfg.copy()
    cfg.dataset.server_test = str(tmp_path / "held-out.csv")
    records = read_server_test(cfg.dataset)
    declared_x, labels = server_test_examples(records, cfg.dataset)
    assert len(labels) == len(rows) and list(labels[:4]) == [0, 1, 2, 0]
    # alcohol is the first column; declared center 13.0, scale 0.8
    np.testing.assert_allclose(declared_x[:, 0], (rows.alcohol.to_numpy() - 13.0) / 0.8, rtol=1e-5)
    cfg.dataset.statistics = {"features": {"alcohol": {"mean": 12.0, "std": 2.0}}}
    federated_x, _ = server_test_examples(records, cfg.dataset)
    np.testing.assert_allclose(federated_x[:, 0], (rows.alcohol.to_numpy() - 12.0) / 2.0, rtol=1e-5)
    assert "held-out.csv (dataset.server_test)" in describe(cfg.dataset)


def test_a_missing_or_nonconforming_file_is_refused_naming_the_key(tabular_cfg, tmp_path):
    cfg = tabular_cfg.copy()
    cfg.dataset.server_test = str(tmp_path / "absent.csv")
    with pytest.raises(ConfigError, match=r"dataset.server_test=.*absent.csv: .*no such file"):
        read_server_test(cfg.dataset)
    rows = _rows(tabular_cfg, 5)
    rows.loc[rows.index[2], "colour"] = "violet"
    rows.to_csv(tmp_path / "bad.csv", index=False)
    cfg.dataset.server_test = str(tmp_path / "bad.csv")
    # The server's own file: the full reason, row included, is fine to show.
    with pytest.raises(ConfigError, match=r"dataset.server_test=.*bad.csv: .*column 'colour' row 3"):
        read_server_test(cfg.dataset)


def test_a_built_in_dataset_refuses_the_key(tmp_path):
    pd.DataFrame({"a": [1]}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(ConfigError, match="dataset.server_test is read only by dataset=tabular or dataset=images"):
        compose_config(["dataset=digits", "model=mlp", f"dataset.server_test={tmp_path / 't.csv'}"])
