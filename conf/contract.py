"""The data contract: what every site's own data must look like, as frozen dataclasses.

A run over sites' own files (``dataset=tabular`` or ``dataset=images``) carries its contract
in the run config, so every site checks its files against the same description before it
trains (clients/local_data.py). The dataclasses validate themselves; :func:`contract_from_config`
adapts the Hydra node ``dataset.contract`` into them, naming the offending key on error.

Why scaling constants live in the contract: a site standardising with its own statistics
would feed the shared model differently scaled inputs than its peers; constants the team
declares (domain knowledge, not computed from any site's records) cost no privacy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from fedguard.conf.schema import ConfigError

FEATURE_KINDS = ("numeric", "categorical")
# How a site's images of another size become the contract's size.
RESIZE_RULES = ("refuse", "resize", "center_crop")
IMAGE_CHANNELS = (1, 3)
TABULAR_KEYS = ("features", "label", "classes")
IMAGE_KEYS = ("channels", "height", "width", "classes", "resize", "mean", "std")
FEATURE_KEYS = ("name", "type", "categories", "center", "scale", "low", "high", "frequencies")
# dataset.preprocessing: declared (the contract's constants, no privacy cost) or federated
# (statistics computed across sites before training: clients/preprocessing.py).
PREPROCESSING_MODES = ("declared", "federated")


class ContractError(ConfigError):
    """A data contract that cannot work; the message names the key and what is allowed."""


def class_text(value: Any) -> str:
    """How a label or category value is compared with the contract: as text, 1.0 read as 1."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _distinct(key: str, values: Sequence[str], least: int) -> None:
    if len(values) < least:
        raise ContractError(f"{key} needs at least {least} entries; got {len(values)}")
    if len(set(values)) != len(values):
        raise ContractError(f"{key} lists {sorted({v for v in values if values.count(v) > 1})} more than once")


@dataclass(frozen=True)
class Feature:
    """One input column: numeric (fed as ``(value - center) / scale``) or categorical (one-hot)."""

    name: str
    kind: str
    categories: tuple[str, ...] = ()
    center: float = 0.0
    scale: float = 1.0
    # The declared range of a numeric column: federated preprocessing clips to it, which is what
    # bounds one record's effect on the released sums (its sensitivity). None: not declared.
    low: float | None = None
    high: float | None = None
    # A categorical column whose category frequencies federated preprocessing releases.
    frequencies: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise ContractError("a feature needs a non-empty name")
        if self.kind not in FEATURE_KINDS:
            raise ContractError(f"feature {self.name!r}: type={self.kind!r}; allowed: {', '.join(FEATURE_KINDS)}")
        if self.kind == "categorical":
            _distinct(f"feature {self.name!r} categories", self.categories, 1)
        elif self.categories:
            raise ContractError(f"feature {self.name!r} is numeric but lists categories")
        if not math.isfinite(self.center) or not math.isfinite(self.scale) or self.scale <= 0:
            raise ContractError(f"feature {self.name!r}: center must be finite and scale finite and > 0")
        if (self.low is None) != (self.high is None):
            raise ContractError(f"feature {self.name!r}: give both low and high (its declared range) or neither")
        if self.low is not None:
            if self.kind != "numeric":
                raise ContractError(f"feature {self.name!r} is categorical; low/high belong to numeric features")
            if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.high <= self.low:
                raise ContractError(f"feature {self.name!r}: low={self.low}, high={self.high}; need finite low < high")
        if self.frequencies and self.kind != "categorical":
            raise ContractError(f"feature {self.name!r}: frequencies=true is for categorical features")

    @property
    def width(self) -> int:
        """How many model inputs the feature takes (one per category for categorical ones)."""
        return len(self.categories) if self.kind == "categorical" else 1


@dataclass(frozen=True)
class TabularContract:
    features: tuple[Feature, ...]
    label: str
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.features:
            raise ContractError("a tabular contract needs at least one feature")
        names = [f.name for f in self.features]
        _distinct("feature names", names, 1)
        if self.label in names:
            raise ContractError(f"the label column {self.label!r} is also listed as a feature")
        _distinct("classes", self.classes, 2)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (sum(f.width for f in self.features),)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def columns(self) -> tuple[str, ...]:
        return (*(f.name for f in self.features), self.label)


@dataclass(frozen=True)
class ImageContract:
    """Images of ``channels`` x ``height`` x ``width``, pixels scaled to [0, 1] then ``(p - mean) / std``."""

    channels: int
    height: int
    width: int
    classes: tuple[str, ...]
    resize: str = "refuse"
    mean: float = 0.5
    std: float = 0.5

    def __post_init__(self) -> None:
        if self.channels not in IMAGE_CHANNELS:
            raise ContractError(f"channels={self.channels}; allowed: 1 (grayscale) or 3 (RGB)")
        if self.height < 1 or self.width < 1:
            raise ContractError(f"image size {self.height}x{self.width} must be at least 1x1")
        _distinct("classes", self.classes, 2)
        if self.resize not in RESIZE_RULES:
            raise ContractError(f"resize={self.resize!r}; allowed: {', '.join(RESIZE_RULES)}")
        if not math.isfinite(self.mean) or not math.isfinite(self.std) or self.std <= 0:
            raise ContractError("mean must be finite and std finite and > 0")

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.channels, self.height, self.width)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


Contract = TabularContract | ImageContract


def _unknown_keys(node: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    if extra := sorted(set(node) - set(allowed)):
        raise ContractError(f"{where}.{extra[0]} is not a contract key; allowed: {', '.join(allowed)}")


def _number(node: Mapping[str, Any], key: str, where: str, default: float) -> float:
    value = node.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ContractError(f"{where}.{key}={value!r} must be a number")
    return float(value)


def _integer(node: Mapping[str, Any], key: str, where: str) -> int:
    if key not in node or node[key] is None:
        raise ContractError(f"{where}.{key} is missing")
    value = node[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ContractError(f"{where}.{key}={value!r} must be an integer")
    return value


def _text_list(node: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = node.get(key)
    if not isinstance(value, list | tuple):
        raise ContractError(f"{where}.{key} must be a list; got {value!r}")
    return tuple(class_text(v) for v in value)


def _feature(node: Any, where: str) -> Feature:
    if not isinstance(node, Mapping):
        raise ContractError(f"{where} must be a mapping with keys {', '.join(FEATURE_KEYS)}")
    _unknown_keys(node, FEATURE_KEYS, where)
    kind = node.get("type", "numeric")
    if kind not in FEATURE_KINDS:
        raise ContractError(f"{where}.type={kind!r}; allowed: {', '.join(FEATURE_KINDS)}")
    frequencies = node.get("frequencies", False)
    if not isinstance(frequencies, bool):
        raise ContractError(f"{where}.frequencies={frequencies!r}; allowed: true, false")
    try:
        return Feature(
            name=str(node.get("name") or ""),
            kind=str(kind),
            categories=_text_list(node, "categories", where) if kind == "categorical" else (),
            center=_number(node, "center", where, 0.0),
            scale=_number(node, "scale", where, 1.0),
            low=None if node.get("low") is None else _number(node, "low", where, 0.0),
            high=None if node.get("high") is None else _number(node, "high", where, 0.0),
            frequencies=frequencies,
        )
    except ContractError as err:
        raise ContractError(f"{where}: {err}") from None


def contract_from_config(kind: str, node: Mapping[str, Any] | None) -> Contract:
    """The contract of ``dataset.contract`` (a plain mapping) for ``dataset.name=kind``."""
    where = "dataset.contract"
    if not isinstance(node, Mapping):
        raise ContractError(f"dataset={kind} needs {where} (the description every site's data must match)")
    try:
        if kind == "tabular":
            _unknown_keys(node, TABULAR_KEYS, where)
            features = node.get("features")
            if not isinstance(features, list | tuple) or not features:
                raise ContractError(f"{where}.features must be a non-empty list of columns")
            label = node.get("label")
            if not isinstance(label, str) or not label:
                raise ContractError(f"{where}.label must name the label column")
            return TabularContract(
                tuple(_feature(f, f"{where}.features[{i}]") for i, f in enumerate(features)),
                label,
                _text_list(node, "classes", where),
            )
        if kind == "images":
            _unknown_keys(node, IMAGE_KEYS, where)
            return ImageContract(
                channels=_integer(node, "channels", where),
                height=_integer(node, "height", where),
                width=_integer(node, "width", where),
                classes=_text_list(node, "classes", where),
                resize=str(node.get("resize", "refuse")),
                mean=_number(node, "mean", where, 0.5),
                std=_number(node, "std", where, 0.5),
            )
    except ContractError as err:
        message = str(err)
        raise ContractError(message if message.startswith(where) else f"{where}: {message}") from None
    raise ContractError(f"dataset.name={kind!r} has no data contract; contracts exist for tabular and images")


def _plain(node: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig | ListConfig) else node


def declared_contract_of(dataset_cfg: Any) -> Contract:
    """The contract as the team declared it, ignoring any federated statistics: what a site's
    privacy accounting fingerprints its data under (the same records whatever the scaling)."""
    return contract_from_config(str(dataset_cfg.name), _plain(dataset_cfg.contract))


def with_statistics(contract: Contract, statistics: Mapping[str, Any] | None) -> Contract:
    """The contract with its scaling replaced by federated statistics (``dataset.statistics``,
    written by the server after federated preprocessing): numeric features standardised by the
    federation's mean and std, images by the federation's pixel mean and std."""
    if not statistics:
        return contract
    where = "dataset.statistics"
    try:
        if isinstance(contract, ImageContract):
            pixels = statistics["pixels"]
            return replace(contract, mean=float(pixels["mean"]), std=float(pixels["std"]))
        numeric = statistics.get("features", {})
        features = tuple(
            replace(f, center=float(numeric[f.name]["mean"]), scale=float(numeric[f.name]["std"]))
            if f.kind == "numeric" and f.name in numeric else f
            for f in contract.features
        )
        return replace(contract, features=features)
    except (KeyError, TypeError, ValueError) as err:
        raise ContractError(f"{where} does not fit the contract ({type(err).__name__}: {err})") from None


def contract_of(dataset_cfg: Any) -> Contract:
    """The contract of a composed ``dataset`` config node (DictConfig or plain mapping), scaled by
    the run's federated statistics when the server has computed them."""
    statistics = dataset_cfg.get("statistics") if hasattr(dataset_cfg, "get") else None
    return with_statistics(declared_contract_of(dataset_cfg), _plain(statistics))
