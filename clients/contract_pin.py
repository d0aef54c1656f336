"""The data contract a site accepts, pinned by the site: a run with any other contract is refused.

Why: the contract comes with the run config, which the server (or whoever submits the run)
writes. A site refuses data that breaks the contract and the server hears the column and the
kind of problem (clients/datasets.py::LocalDataError.public). A server free to choose the
contract can therefore ask "does column c hold a value outside the set S I picked?" run after
run, narrowing S, and learn facts about single records for free (no refusal is accounted).
A site that pins its contract answers every other contract with the same refusal, which says
only that the contract differs: the server learns nothing about the data from it.

Two ways to pin (node config ``contract``, site YAML ``contract:``, ``fedguard client --contract``):

- a YAML file: the contract the team agreed on, as ``dataset.contract`` (the mapping itself) or
  a whole dataset config file holding ``name`` and ``contract`` (conf/dataset/tabular.yaml);
- ``first-use``: the first run's contract is written to ``<state-dir>/contract-pin.json`` and
  every later run must carry the same one (trust on first use: the first contract is taken as
  the agreed one; delete the file to accept a new one deliberately).

Only the declared contract is compared (columns, types, categories, ranges, scaling constants,
label, classes; image size, channels, resize rule); the federation's statistics that the
server adds after preprocessing are not part of it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig

from fedguard.clients.site import CONTRACT_KEY, PIN_FIRST_USE, SiteConfigError, SiteSettings
from fedguard.conf.contract import Contract, ContractError, contract_from_config, declared_contract_of

logger = logging.getLogger(__name__)

PIN_FILE = "contract-pin.json"
PIN_FORMAT = 1


class ContractRefused(SiteConfigError):
    """The run's contract is not the one this site accepts. The message (what the server hears)
    says only that: which part differs would tell the server about the site's pin, and trying
    contracts is what the pin is there to stop."""


REFUSAL = "the run's data contract differs from the one this site accepts; it takes part only under that contract"


def _plain(node: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def contract_from_file(path: Path) -> tuple[str, Contract]:
    """``(kind, contract)`` from a site's contract file: a dataset config (``name`` + ``contract``)
    or the contract mapping alone (images when it has ``channels``, tabular otherwise)."""
    try:
        node = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise SiteConfigError(f"node config '{CONTRACT_KEY}': {path} cannot be read as YAML: {err}") from None
    if not isinstance(node, Mapping):
        raise SiteConfigError(f"node config '{CONTRACT_KEY}': {path} does not hold a YAML mapping")
    if "contract" in node:
        kind, node = str(node.get("name", "")), node["contract"]
    else:
        kind = "images" if isinstance(node, Mapping) and "channels" in node else "tabular"
    try:
        return kind, contract_from_config(kind, node)
    except ContractError as err:
        raise SiteConfigError(f"node config '{CONTRACT_KEY}': {path} is not a data contract: {err}") from None


def _write_pin(path: Path, kind: str, node: Any) -> None:
    """Write the pin, readable by this site's user only, unless one is already there.

    The pin appears whole (written to a private temporary name, then hard-linked) and never
    replaces an existing one: two tasks that both found no pin race here, and with a replace
    each could pin, and then read the site's data under, its own contract. With a link the
    first wins and every task reads back that one pin.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(8)}.partial")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as out:
            json.dump({"format": PIN_FORMAT, "kind": kind, "contract": node}, out, indent=2, sort_keys=True)
            out.flush()
            os.fsync(out.fileno())
        os.link(partial, path)
    except FileExistsError:
        logger.info("another task pinned this site's data contract first (%s)", path)
    finally:
        partial.unlink(missing_ok=True)


def _pinned_first_use(state_dir: Path, kind: str, node: Any) -> tuple[str, Contract, str]:
    path = state_dir / PIN_FILE
    if not path.exists():
        _write_pin(path, kind, node)
        logger.warning("pinned this site's data contract on first use (%s); later runs must carry the same contract",
                       path)
    try:
        pin = json.loads(path.read_text(encoding="utf-8"))
        return str(pin["kind"]), contract_from_config(str(pin["kind"]), pin["contract"]), str(path)
    except (OSError, ValueError, KeyError, TypeError, ContractError) as err:
        # A damaged pin must not turn into "accept anything": refuse until the site repairs it.
        raise SiteConfigError(f"this site's contract pin {path} cannot be read ({type(err).__name__}); "
                              "restore or delete it") from None


def check_contract(dataset_cfg: Any, site: SiteSettings) -> None:
    """Refuse (ContractRefused) a run whose declared contract is not the one this site pinned;
    with no pin setting every contract is accepted, as before."""
    if site.contract is None:
        return
    kind, run = str(dataset_cfg.name), declared_contract_of(dataset_cfg)
    if site.contract == PIN_FIRST_USE:
        pinned_kind, pinned, source = _pinned_first_use(Path(str(site.state_dir)), kind, _plain(dataset_cfg.contract))
    else:
        (pinned_kind, pinned), source = contract_from_file(Path(site.contract)), site.contract
    if pinned_kind != kind or pinned != run:
        logger.warning("refusing the run: its data contract (dataset=%s) is not the one pinned in %s", kind, source)
        raise ContractRefused(REFUSAL)
