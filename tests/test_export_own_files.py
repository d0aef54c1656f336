"""``fedguard export --data PATH``: a model trained on sites' own files, checked on a site's files.

Such a run has no shared test split; the export reads the site's files under the run's contract,
feeds the exported model the raw columns (numeric as measured, categorical one-hot) and compares
it with the PyTorch model fed what training fed it.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from fedguard.clients.local_data import encode_records, read_site_records
from fedguard.clients.own_files import raw_own_examples
from fedguard.conf.contract import contract_of, declared_contract_of
from fedguard.simulations.example_sites import write_sites
from test_export_serve import TOLERANCE, fake_run


@pytest.fixture(scope="module")
def wine_site(tmp_path_factory):
    return write_sites(tmp_path_factory.mktemp("wine"))[1]


@pytest.mark.simulation  # reads a site's CSV through the contract: about a second under load
def test_raw_inputs_normalize_to_what_training_fed_the_model(compose, wine_site):
    cfg = compose(["dataset=tabular"])
    federated = copy.deepcopy(cfg)  # with federation statistics, the scaling is theirs, not the contract's
    numeric = [f.name for f in declared_contract_of(cfg.dataset).features if f.kind == "numeric"]
    federated.dataset.statistics = {"features": {n: {"mean": 1.0 + i, "std": 2.0 + i} for i, n in enumerate(numeric)}}
    for run_cfg in (cfg, federated):
        raw, labels, norm, names = raw_own_examples(run_cfg.dataset, str(wine_site))
        records = read_site_records(str(wine_site), declared_contract_of(run_cfg.dataset))
        np.testing.assert_allclose(norm.apply(raw), encode_records(records, contract_of(run_cfg.dataset)), atol=1e-5)
        np.testing.assert_array_equal(labels, records.labels)
        assert names[0] == numeric[0] and "colour=pale" in names and len(names) == raw.shape[1]


@pytest.mark.simulation  # TorchScript export and its check: seconds
def test_export_checks_the_model_on_the_sites_files(tmp_path, compose, wine_site):
    from fedguard.server.checkpoint import load_global_model
    from fedguard.server.export import ExportError, export_run, load_exported

    run = fake_run(tmp_path, compose, ["dataset=tabular", "model=mlp"])
    with pytest.raises(ExportError, match="--data PATH"):
        export_run(run, "torchscript", tmp_path / "none")
    result = export_run(run, "torchscript", tmp_path / "out", data=wine_site)
    cfg = compose(["dataset=tabular"])
    raw, labels, _, _ = raw_own_examples(cfg.dataset, str(wine_site))
    records = read_site_records(str(wine_site), declared_contract_of(cfg.dataset))
    model = load_global_model(run / "checkpoints" / "final.pt")
    with torch.inference_mode():
        reference = model(torch.from_numpy(encode_records(records, contract_of(cfg.dataset)))).numpy()
    exported = load_exported(result.model_path, "torchscript")(raw)
    assert np.max(np.abs(exported - reference)) <= TOLERANCE
    card = json.loads((tmp_path / "out" / "model_card.json").read_text())
    assert card["export"]["test_examples"] == len(labels) == len(records.labels)
    assert card["export"]["exported_test_accuracy"] == pytest.approx(float(np.mean(exported.argmax(1) == labels)))
    assert card["contract"]["classes"] == list(declared_contract_of(cfg.dataset).classes)
    assert str(wine_site) in card["metrics"]["measured_on"]
    digits = fake_run(tmp_path / "digits", compose, ["dataset=digits", "model=logreg"])
    with pytest.raises(ExportError, match="--data is for runs over sites' own files"):
        export_run(digits, "torchscript", tmp_path / "digits-out", data=wine_site)
