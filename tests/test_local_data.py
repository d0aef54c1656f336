"""Sites' own files against the data contract: every format reads the same, every refusal names
the file and the column or row, and the reason a site sends never quotes a cell's value."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.app import Context, RecordDict
from PIL import Image

import fedguard.conf
from omegaconf import OmegaConf

from fedguard.clients.app import app as client_app
from fedguard.clients.app import load_local_data
from fedguard.clients.datasets import LocalDataError, expected_layout
from fedguard.clients.local_data import read_site_examples
from fedguard.clients.site import SiteConfigError, read_site_settings
from fedguard.conf import compose_config, validate_config
from fedguard.conf.contract import (
    ContractError,
    Feature,
    ImageContract,
    TabularContract,
    contract_from_config,
    contract_of,
)
from fedguard.conf.schema import ConfigError
from own_files_support import tiny_image_folder, train_request

CONTRACT = TabularContract(
    features=(Feature("age", "numeric", center=50.0, scale=10.0), Feature("smoker", "categorical", ("no", "yes"))),
    label="outcome",
    classes=("healthy", "ill"),
)
ROWS = {"age": [40.0, 60.0, 55.0, 30.0], "smoker": ["no", "yes", "yes", "no"], "outcome": ["healthy", "ill", "ill", "healthy"]}
EXPECTED_X = np.array([[-1, 1, 0], [1, 0, 1], [0.5, 0, 1], [-2, 1, 0]], dtype=np.float32)
EXPECTED_Y = np.array([0, 1, 1, 0])


def _csv(tmp_path, rows=None, name="site.csv"):
    path = tmp_path / name
    pd.DataFrame(rows or ROWS).to_csv(path, index=False)
    return path


# --- the contract, as config and as dataclasses ------------------------------------------------

@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({"features": [{"name": "a", "type": "text"}], "label": "y", "classes": [0, 1]}, r"features\[0\]\.type='text'"),
        ({"features": [{"name": "a"}], "label": "y", "classes": [0]}, "classes needs at least 2"),
        ({"features": [{"name": "a"}], "label": "a", "classes": [0, 1]}, "also listed as a feature"),
        ({"features": [{"name": "a", "type": "categorical"}], "label": "y", "classes": [0, 1]},
         r"features\[0\]\.categories must be a list"),
        ({"features": [{"name": "a", "scale": 0}], "label": "y", "classes": [0, 1]}, "scale finite and > 0"),
        ({"features": [{"name": "a", "colour": 1}], "label": "y", "classes": [0, 1]},
         r"features\[0\]\.colour is not a contract key"),
        ({"features": [], "label": "y", "classes": [0, 1]}, "features must be a non-empty list"),
        ({"features": [{"name": "a"}], "classes": [0, 1]}, "label must name the label column"),
    ],
)
def test_bad_tabular_contracts_name_the_key(node, message):
    with pytest.raises(ContractError, match=message) as err:
        contract_from_config("tabular", node)
    assert str(err.value).startswith("dataset.contract")


@pytest.mark.parametrize(
    ("change", "message"),
    [({"channels": 2}, "channels=2"), ({"resize": "stretch"}, "resize='stretch'"), ({"height": None}, "height is missing"),
     ({"classes": ["a", "a"]}, "more than once"), ({"std": 0}, "std finite and > 0")],
)
def test_bad_image_contracts_name_the_key(change, message):
    node = {"channels": 1, "height": 8, "width": 8, "classes": ["a", "b"], **change}
    with pytest.raises(ContractError, match=message):
        contract_from_config("images", node)


def test_shipped_contracts_compose_and_give_the_model_its_shape():
    images = compose_config(["dataset=images", "model=cnn"])  # one composition (about a second); copies for the rest
    tabular = copy.deepcopy(images)
    shipped = OmegaConf.load(Path(fedguard.conf.__file__).parent / "dataset" / "tabular.yaml")
    tabular.dataset.name, tabular.dataset.contract = shipped.name, shipped.contract
    tabular.model.name = "mlp"
    validate_config(tabular)
    assert expected_layout(tabular.dataset) == ((11 + 1 + 3,), 3)
    assert isinstance(contract_of(images.dataset), ImageContract)
    assert expected_layout(images.dataset) == ((1, 28, 28), 10)
    built_in = copy.deepcopy(images)
    built_in.dataset.name = "digits"
    with pytest.raises(ConfigError, match="dataset.contract is read only by"):
        validate_config(built_in)
    built_in.dataset.contract = None
    built_in.simulation.site_data = ["a", "b", "c", "d", "e"]
    with pytest.raises(ConfigError, match="simulation.site_data maps sites"):
        validate_config(built_in)
    tabular.simulation.site_data = ["a"]
    with pytest.raises(ConfigError, match="lists 1 paths for simulation.num_clients=5"):
        validate_config(tabular)


# --- every table format reads the same ---------------------------------------------------------

def test_csv_parquet_and_npz_give_the_same_examples(tmp_path):
    frame = pd.DataFrame(ROWS)
    paths = [_csv(tmp_path), tmp_path / "site.parquet", tmp_path / "site.npz"]
    frame.to_parquet(paths[1])
    np.savez(paths[2], **{c: frame[c].to_numpy(dtype=float if c == "age" else str) for c in frame})
    for path in paths:
        x, y = read_site_examples(str(path), CONTRACT)
        np.testing.assert_allclose(x, EXPECTED_X, err_msg=str(path))
        np.testing.assert_array_equal(y, EXPECTED_Y, err_msg=str(path))


def test_a_directory_with_one_table_is_that_table(tmp_path):
    _csv(tmp_path)
    x, _ = read_site_examples(str(tmp_path), CONTRACT)
    assert x.shape == (4, 3)
    _csv(tmp_path, name="second.csv")
    with pytest.raises(LocalDataError, match="expected one data file"):
        read_site_examples(str(tmp_path), CONTRACT)


# --- each refusal names the file and the column or row ----------------------------------------

@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.pop("smoker"), r"column 'smoker' is missing"),
        (lambda r: r.__setitem__("age", [40, "forty", 55, 30]), r"column 'age' must be numeric; row 2 is not a number"),
        (lambda r: r.__setitem__("age", [40, 60, None, 30]), r"column 'age' row 3 is empty, NaN or infinite"),
        (lambda r: r.__setitem__("smoker", ["no", "yes", "sometimes", "no"]),
         r"column 'smoker' row 3 holds a category the contract does not list"),
        (lambda r: r.__setitem__("outcome", ["healthy", "ill", "ill", "dead"]),
         r"column 'outcome' row 4 holds a label the contract does not list"),
        (lambda r: r.__setitem__("smoker", ["no", None, "yes", "no"]), r"column 'smoker' row 2 is empty or NaN"),
    ],
)
def test_table_refusals_name_file_column_and_row(tmp_path, edit, message):
    rows = {k: list(v) for k, v in ROWS.items()}
    edit(rows)
    path = _csv(tmp_path, rows)
    with pytest.raises(LocalDataError, match=message) as err:
        read_site_examples(str(path), CONTRACT)
    assert str(path) in str(err.value)
    for secret in ("forty", "sometimes", "dead"):  # the reason travels to the server: no cell values
        assert secret not in str(err.value)


def test_empty_and_unreadable_tables_are_refused(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("age,smoker,outcome\n")
    with pytest.raises(LocalDataError, match="holds no rows"):
        read_site_examples(str(empty), CONTRACT)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(LocalDataError, match="broken.parquet: unreadable"):
        read_site_examples(str(broken), CONTRACT)
    with pytest.raises(LocalDataError, match="no such file or directory"):
        read_site_examples(str(tmp_path / "absent.csv"), CONTRACT)


# --- image folders -----------------------------------------------------------------------------

IMAGES = ImageContract(channels=1, height=8, width=8, classes=("cat", "dog"), resize="refuse")


def _image_folder(root, size=(8, 8), classes=("cat", "dog"), per_class=3):
    return tiny_image_folder(root, size, classes, per_class)


def test_image_folder_and_npz_read_the_same(tmp_path):
    folder = _image_folder(tmp_path / "folder")
    x, y = read_site_examples(str(folder), IMAGES)
    assert x.shape == (6, 1, 8, 8) and list(y) == [0, 0, 0, 1, 1, 1]
    np.testing.assert_allclose(x[4, 0, 0, 0], (41 / 255 - 0.5) / 0.5, rtol=1e-6)
    raw = np.stack([np.full((8, 8), 40 * (i // 3) + i % 3, dtype=np.uint8) for i in range(6)])
    np.savez(tmp_path / "site.npz", images=raw, labels=y)
    x_npz, y_npz = read_site_examples(str(tmp_path / "site.npz"), IMAGES)
    np.testing.assert_allclose(x_npz, x)
    np.testing.assert_array_equal(y_npz, y)


# Importing Hugging Face `datasets` alone costs over a second: in the slow tier with the simulations.
@pytest.mark.simulation
def test_saved_datasets_directories_read_like_the_other_formats(tmp_path):
    from datasets import Dataset

    Dataset.from_pandas(pd.DataFrame(ROWS)).save_to_disk(str(tmp_path / "table"))
    x, y = read_site_examples(str(tmp_path / "table"), CONTRACT)
    np.testing.assert_allclose(x, EXPECTED_X)
    np.testing.assert_array_equal(y, EXPECTED_Y)
    raw = [np.full((8, 8), 40 * (i // 3) + i % 3, dtype=np.uint8) for i in range(6)]
    Dataset.from_dict({"image": [Image.fromarray(a) for a in raw], "label": ["cat"] * 3 + ["dog"] * 3}).save_to_disk(
        str(tmp_path / "images"))
    x_hf, y_hf = read_site_examples(str(tmp_path / "images"), IMAGES)
    x_folder, y_folder = read_site_examples(str(_image_folder(tmp_path / "folder")), IMAGES)
    np.testing.assert_allclose(x_hf, x_folder)
    np.testing.assert_array_equal(y_hf, y_folder)


def test_image_refusals_name_the_file_or_folder(tmp_path):
    folder = _image_folder(tmp_path / "sized", size=(10, 12))
    with pytest.raises(LocalDataError, match=r"cat/0.png: image is 10x12 .* resize=refuse"):
        read_site_examples(str(folder), IMAGES)
    resized = read_site_examples(str(folder), ImageContract(1, 8, 8, ("cat", "dog"), resize="resize"))[0]
    assert resized.shape == (6, 1, 8, 8)
    cropped = read_site_examples(str(folder), ImageContract(1, 8, 8, ("cat", "dog"), resize="center_crop"))[0]
    assert cropped.shape == (6, 1, 8, 8)
    with pytest.raises(LocalDataError, match="smaller than the contract's 16x16"):
        read_site_examples(str(folder), ImageContract(1, 16, 16, ("cat", "dog"), resize="center_crop"))

    broken = _image_folder(tmp_path / "broken")
    (broken / "dog" / "1.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(LocalDataError, match=r"dog/1.png: unreadable image"):
        read_site_examples(str(broken), IMAGES)

    strange = _image_folder(tmp_path / "strange", classes=("cat", "horse"))
    with pytest.raises(LocalDataError, match=r"horse: folder is not a class of the contract"):
        read_site_examples(str(strange), IMAGES)

    empty = tmp_path / "empty"
    (empty / "cat").mkdir(parents=True)
    with pytest.raises(LocalDataError, match="class folders hold no images"):
        read_site_examples(str(empty), IMAGES)
    (tmp_path / "bare").mkdir()
    with pytest.raises(LocalDataError, match="holds no class sub-folders"):
        read_site_examples(str(tmp_path / "bare"), IMAGES)

    np.savez(tmp_path / "labels.npz", images=np.zeros((2, 8, 8), dtype=np.uint8), labels=np.array([0, 5]))
    with pytest.raises(LocalDataError, match=r"labels.npz image 2: label outside the contract's classes"):
        read_site_examples(str(tmp_path / "labels.npz"), IMAGES)


# --- the site: settings and its refusal as the server hears it --------------------------------

def test_a_site_with_its_own_data_needs_no_partition_count():
    settings = read_site_settings({"partition-id": 2, "data": "/srv/site.csv"})
    assert settings.data == "/srv/site.csv"
    with pytest.raises(SiteConfigError, match="num-partitions"):
        read_site_settings({"partition-id": 2})


def _site_cfg(tmp_path):
    contract = {"features": [{"name": "age", "center": 50, "scale": 10},
                             {"name": "smoker", "type": "categorical", "categories": ["no", "yes"]}],
                "label": "outcome", "classes": ["healthy", "ill"]}
    cfg = compose_config(["dataset=tabular", "model=logreg"])
    cfg.dataset.contract = contract
    return cfg


def test_site_loads_and_splits_its_own_file(tmp_path):
    cfg = _site_cfg(tmp_path)
    rows = {k: v * 5 for k, v in ROWS.items()}
    settings = read_site_settings({"partition-id": 0, "data": str(_csv(tmp_path, rows))})
    data = load_local_data(cfg, settings)
    assert len(data.train_y) + len(data.validation_y) == 20 and len(data.validation_y) == 4
    assert data.input_shape == (3,) and data.num_classes == 2
    with pytest.raises(SiteConfigError, match="fedguard client --data PATH"):
        load_local_data(cfg, read_site_settings({"partition-id": 0, "num-partitions": 1}))


@pytest.mark.simulation  # a full ClientApp request (model, mods): over a second on a loaded 2-core machine
@pytest.mark.usefixtures("flower_task_identity")
def test_refusal_reaches_the_server_as_a_reason_without_the_data(tmp_path, caplog):
    cfg = _site_cfg(tmp_path)
    rows = {k: list(v) for k, v in ROWS.items()}
    rows["smoker"][1] = "ex-smoker since 2019"
    path = _csv(tmp_path, rows)
    message = train_request(cfg)
    context = Context(run_id=1, node_id=3, node_config={"partition-id": 0, "data": str(path)}, state=RecordDict(),
                      run_config={})
    with caplog.at_level(logging.ERROR):
        reply = client_app(message, context)
    assert reply.has_error()
    reason = reply.error.reason
    assert reason.startswith("LocalDataError") and "column 'smoker' holds a category the contract does not list" in reason
    # Which row it is singles out a record of a contract the server chose: only the site's log says so.
    assert "row" not in reason and "ex-smoker" not in reason and str(path.parent) not in reason
    assert "column 'smoker' row 2 holds a category" in caplog.text


def test_fedguard_client_takes_data_instead_of_partition_count(tmp_path, capsys):
    from fedguard.clients.launch import client_main

    common = ["--server", "127.0.0.1:9", "--ca", str(tmp_path / "ca.crt"), "--partition-id", "0",
              "--state-dir", str(tmp_path / "state")]
    with pytest.raises(SystemExit):
        client_main(common)  # neither --num-partitions nor --data
    assert "--num-partitions is required unless" in capsys.readouterr().err
    assert client_main([*common, "--data", str(tmp_path / "absent.csv")]) == 1
    assert "absent.csv: no such file or directory" in capsys.readouterr().err
    # with its file present the site gets as far as its TLS material (which this test has none of)
    assert client_main([*common, "--data", str(_csv(tmp_path))]) == 1
    assert "ca.crt" in capsys.readouterr().err


def test_a_requests_data_key_is_the_one_its_parsed_config_gives():
    """The data cache's key is taken once per config text (app._data_text_of); it must be the key
    the parsed config itself gives, and differ when the partitioning does."""
    from fedguard.clients.app import _data_text, _data_text_of
    from fedguard.conf.run_config import cached_config_from_yaml, config_to_yaml

    texts = [config_to_yaml(compose_config(overrides)) for overrides in (["dataset=digits"], ["dataset=digits", "seed=7"])]
    keys = [_data_text_of(text) for text in texts]
    assert keys == [_data_text(cached_config_from_yaml(text)) for text in texts]
    assert keys[0] != keys[1]
