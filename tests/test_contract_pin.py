"""A site pins the data contract it accepts; a run with another contract is refused, saying only that.

The attack: the server writes the contract, and a refusal names the column and the kind of
problem. Dropping one class from ``classes`` asks "does this site hold a record of that class?"
and the answer (refused, or not) comes back uncharged. With a pin both probes get the same
refusal; without one (the behaviour before pins) they are told apart, which the test shows too.
"""

from __future__ import annotations

import copy
import os
import stat
from pathlib import Path

import pandas as pd
import pytest
import yaml
from flwr.app import ConfigRecord, Message, RecordDict
from omegaconf import OmegaConf

from fedguard.clients.contract_pin import PIN_FILE, REFUSAL
from fedguard.clients.site import SiteConfigError, read_site_settings
from fedguard.clients.wire import protocol
from fedguard.conf import compose_config
from fedguard.conf.run_config import config_to_yaml
from tests.preprocessing_support import LoopbackGrid, wine_sites

pytestmark = pytest.mark.usefixtures("flower_task_identity")
NODE = 102  # the example site that never saw class_0


@pytest.fixture(scope="module")
def base_cfg():
    return compose_config(["dataset=tabular", "model=mlp", "dataset.preprocessing=federated", "simulation.num_clients=3"])


def _without_class(cfg, dropped: str):
    probe = copy.deepcopy(cfg)
    probe.dataset.contract.classes = [c for c in cfg.dataset.contract.classes if c != dropped]
    return probe


def _ask(grid: LoopbackGrid, cfg, lineage: str) -> str:
    """What the server hears from the site for a preprocessing request under ``cfg``."""
    request = ConfigRecord({protocol.FEDGUARD_CONFIG_KEY: config_to_yaml(cfg), protocol.LINEAGE_KEY: lineage})
    message = Message(RecordDict({protocol.CONFIG_KEY: request}), dst_node_id=NODE,
                      message_type=protocol.PREPROCESS_MESSAGE_TYPE)
    (reply,) = grid.send_and_receive([message])
    return str(reply.error.reason) if reply.has_error() else "answered"


def _site(tmp_path: Path, **extra) -> tuple[dict, set[str]]:
    config = {**wine_sites(tmp_path, state=False)[NODE], **extra}
    labels = set(pd.read_csv(next(Path(config["data"]).glob("*.csv")))["cultivar"])
    return config, labels


def _probes(cfg, labels: set[str]):
    absent = next(c for c in cfg.dataset.contract.classes if c not in labels)
    present = next(c for c in cfg.dataset.contract.classes if c in labels)
    return _without_class(cfg, absent), _without_class(cfg, present)


@pytest.mark.simulation  # the real ClientApp reads a site's file: over a second
def test_a_pinned_site_answers_every_other_contract_alike(base_cfg, tmp_path):
    pin = tmp_path / "agreed-contract.yaml"
    pin.write_text(yaml.safe_dump({"name": "tabular", "contract": OmegaConf.to_container(base_cfg.dataset.contract)}))
    config, labels = _site(tmp_path, contract=str(pin))
    grid = LoopbackGrid({NODE: config})
    probe_absent, probe_present = _probes(base_cfg, labels)
    answers = {_ask(grid, probe_absent, "probe-a"), _ask(grid, probe_present, "probe-b")}
    assert answers == {f"ContractRefused: {REFUSAL}"}
    assert _ask(grid, base_cfg, "agreed") == "answered"  # the pinned contract itself is served


@pytest.mark.simulation  # the real ClientApp reads a site's file: over a second
def test_without_a_pin_the_two_probes_tell_the_server_which_classes_the_site_holds(base_cfg, tmp_path):
    """The leak the pin closes (the behaviour of a site that pins nothing, and of every site before pins)."""
    config, labels = _site(tmp_path)
    grid = LoopbackGrid({NODE: config})
    probe_absent, probe_present = _probes(base_cfg, labels)
    assert _ask(grid, probe_absent, "probe-a") == "answered"
    assert "label" in _ask(grid, probe_present, "probe-b")


@pytest.mark.simulation  # the real ClientApp reads a site's file: over a second
def test_first_use_pins_the_first_contract_in_the_state_dir(base_cfg, tmp_path):
    config, labels = _site(tmp_path, contract="first-use", **{"state-dir": str(tmp_path / "state")})
    grid = LoopbackGrid({NODE: config})
    assert _ask(grid, base_cfg, "first") == "answered"
    pin = tmp_path / "state" / PIN_FILE
    assert stat.S_IMODE(os.stat(pin).st_mode) == 0o600
    probe_absent, probe_present = _probes(base_cfg, labels)
    assert _ask(grid, probe_absent, "second") == _ask(grid, probe_present, "third") == f"ContractRefused: {REFUSAL}"
    assert _ask(grid, base_cfg, "fourth") == "answered"
    pin.write_text("{not json")  # a damaged pin refuses everything rather than accepting anything
    assert "cannot be read" in _ask(grid, base_cfg, "fifth")


def test_the_pin_setting_is_checked_when_the_site_starts(tmp_path):
    with pytest.raises(SiteConfigError, match="state-dir"):
        read_site_settings({"partition-id": 0, "data": str(tmp_path), "contract": "first-use"})
    with pytest.raises(SiteConfigError, match="'contract'"):
        read_site_settings({"partition-id": 0, "data": str(tmp_path), "contract": 3})


def test_fedguard_client_pins_on_first_use_by_default_with_own_files(tmp_path):
    from fedguard.clients.launch import _contract_setting, parse_client_args

    common = ["--server", "127.0.0.1:1", "--ca", "ca.crt", "--partition-id", "0"]
    assert _contract_setting(parse_client_args([*common, "--data", str(tmp_path)])) == "first-use"
    assert _contract_setting(parse_client_args([*common, "--data", str(tmp_path), "--contract", "any"])) is None
    assert _contract_setting(parse_client_args([*common, "--num-partitions", "3"])) is None  # built-in data: no contract
    pinned = _contract_setting(parse_client_args([*common, "--data", str(tmp_path), "--contract", "agreed.yaml"]))
    assert pinned == str(Path("agreed.yaml").resolve())


def test_a_task_that_loses_the_first_use_race_cannot_pin_its_own_contract(base_cfg, tmp_path):
    """Two tasks that both found no pin (the server sent them at once, with different contracts)
    both reach the write. Before, the later write replaced the earlier pin, so each task could pin
    and then read the site's data under its own contract: one "first use" became many probes."""
    from fedguard.clients.contract_pin import _pinned_first_use, _write_pin  # noqa: PLC0415

    state = tmp_path / "state"
    first = OmegaConf.to_container(base_cfg.dataset.contract)
    other = OmegaConf.to_container(_without_class(base_cfg, base_cfg.dataset.contract.classes[0]).dataset.contract)
    _, pinned, _ = _pinned_first_use(state, "tabular", first)
    _write_pin(state / PIN_FILE, "tabular", other)  # the racing task's write, after its own check found no pin
    _, read_back, _ = _pinned_first_use(state, "tabular", other)
    assert read_back == pinned
    assert [p.name for p in state.iterdir()] == [PIN_FILE]  # no temporary file left behind
