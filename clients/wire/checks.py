"""Decoding of the records fedguard's server and clients exchange, with typed rejections.

Both sides receive messages from parties they do not control: the server from clients at
other sites, clients from a server (or anything posing as one). Every value read out of a
message goes through these helpers, so malformed input ends in :class:`MalformedMessage`
with a reason naming the record and key, never in a ``KeyError`` deep inside training or
aggregation. Arrays are decoded by checking the ``.npy`` header against the expected
shape and dtype *before* any buffer is materialised, so a forged header cannot make the
receiver allocate or parse more than the model's own size.
"""

from __future__ import annotations

import io
import math
from functools import lru_cache
from typing import Any

import numpy as np
import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from fedguard.clients.wire import protocol
from fedguard.conf.run_config import cached_config_from_yaml
from fedguard.conf.schema import ConfigError

# Slack for the .npy header (magic, version, dict literal, padding) on top of the raw data.
MAX_NPY_HEADER_BYTES = 4096
# Example counts are summed as float64 weights; above 2**53 they stop being exact integers
# and a few such counts overflow FedAvg's weight sum to infinity.
MAX_EXAMPLE_COUNT = 2**53
NUMPY_STYPE = "numpy.ndarray"
# SecAgg+ fields: X25519 public keys are 32 bytes; a sealed share is nonce + two Shamir
# shares + tag (well under the bound); no round has more peers than this.
PUBLIC_KEY_BYTES = 32
MAX_SHARE_BYTES = 4096
MAX_PEERS = 100_000


class MalformedMessage(ValueError):
    """A message's content does not have the form the protocol expects; the text says where."""


def require_record(content: RecordDict, key: str, kind: type) -> Any:
    """The record ``key`` of ``content``, which must be of type ``kind``."""
    record = content.get(key)
    if not isinstance(record, kind):
        found = "nothing" if record is None else type(record).__name__
        raise MalformedMessage(f"record '{key}' must be a {kind.__name__}; found {found}")
    return record


def only_records(content: RecordDict, allowed: set[str]) -> None:
    """Refuse records the protocol does not define (Flower's strategies reject extra ones later, loudly)."""
    extra = sorted(set(content.keys()) - allowed)
    if extra:
        raise MalformedMessage(f"unexpected record(s) {extra}; allowed: {sorted(allowed)}")


def number(record: ConfigRecord | MetricRecord, key: str, *, default: float | None = None) -> float:
    """A scalar int or float (never bool, list or string) from a record."""
    if key not in record and default is not None:
        return default
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MalformedMessage(f"'{key}'={value!r:.80} must be a number")
    return value


def finite_number(record: ConfigRecord | MetricRecord, key: str, low: float, high: float, **kw: Any) -> float:
    value = number(record, key, **kw)
    if not math.isfinite(value) or not low <= value <= high:
        raise MalformedMessage(f"'{key}'={value!r} must be finite and within [{low}, {high}]")
    return value


def count(record: ConfigRecord | MetricRecord, key: str, *, minimum: int, default: int | None = None) -> int:
    """A whole number >= ``minimum`` (floats holding whole numbers are accepted, as Flower may send them)."""
    value = finite_number(record, key, minimum, MAX_EXAMPLE_COUNT, default=default)
    if not float(value).is_integer():
        raise MalformedMessage(f"'{key}'={value!r} must be a whole number")
    return int(value)


def text(record: ConfigRecord, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise MalformedMessage(f"'{key}' must be a string; found {type(value).__name__}")
    return value


def typed_list(record: ConfigRecord, key: str, kind: type, max_length: int) -> list:
    """A list of ``kind`` values of at most ``max_length`` entries (a bool is not an int here)."""
    value = record.get(key)
    if not isinstance(value, list):
        raise MalformedMessage(f"'{key}' must be a list; found {type(value).__name__}")
    if len(value) > max_length:
        raise MalformedMessage(f"'{key}' holds {len(value)} entries; at most {max_length} are possible")
    if any(isinstance(item, bool) or not isinstance(item, kind) for item in value):
        raise MalformedMessage(f"'{key}' must hold only {kind.__name__} values")
    return value


def node_ids(record: ConfigRecord, key: str, max_length: int) -> list[int]:
    """Distinct non-negative node ids."""
    ids = typed_list(record, key, int, max_length)
    if any(node < 0 for node in ids) or len(set(ids)) != len(ids):
        raise MalformedMessage(f"'{key}' must hold distinct non-negative node ids")
    return ids


def byte_strings(record: ConfigRecord, key: str, max_length: int, *, size: tuple[int, int]) -> list[bytes]:
    """A list of byte strings, each ``size[0] <= len <= size[1]``."""
    values = typed_list(record, key, bytes, max_length)
    low, high = size
    if any(not low <= len(value) <= high for value in values):
        raise MalformedMessage(f"'{key}' entries must be {low}..{high} bytes long")
    return values


@lru_cache(maxsize=1024)
def _npy_headers(shape: tuple[int, ...], dtype: np.dtype) -> tuple[bytes, bytes]:
    """The exact .npy headers ``np.save`` writes for ``dtype`` of ``shape`` (C order, Fortran order).

    Comparing bytes with these means no parser ever runs on untrusted input: numpy's own
    header parser raises half a dozen exception types on junk (found by the fuzz tests).
    """
    headers = []
    for fortran in (False, True):
        stream = io.BytesIO()
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": fortran, "shape": shape}
        np.lib.format.write_array_header_1_0(stream, header)
        headers.append(stream.getvalue())
    return headers[0], headers[1]


def _npy_payload(name: str, data: bytes, shape: tuple[int, ...], dtype: np.dtype) -> tuple[int, bool]:
    """Offset of the raw data in an .npy buffer, and whether it is Fortran-ordered; checks the header."""
    for fortran, header in zip((False, True), _npy_headers(shape, dtype)):
        if data.startswith(header):
            if len(data) - len(header) != math.prod(shape) * dtype.itemsize:
                raise MalformedMessage(f"array '{name}' has {len(data) - len(header)} data bytes for {dtype}{shape}")
            return len(header), fortran
    raise MalformedMessage(f"array '{name}' does not start with the .npy header of {dtype}{shape}")


def decode_array(name: str, array: object, shape: tuple[int, ...], dtype: np.dtype | str) -> np.ndarray:
    """The ndarray inside a Flower ``Array``, which must be exactly ``dtype`` of ``shape``.

    The size is checked before anything is parsed: a reply "far beyond the model's size"
    costs a length comparison, not a decode. Returns a read-only view.
    """
    dtype = np.dtype(dtype)
    if not isinstance(array, Array):
        raise MalformedMessage(f"'{name}' is a {type(array).__name__}, not an Array")
    if array.stype != NUMPY_STYPE or not isinstance(array.data, bytes):
        raise MalformedMessage(f"array '{name}' uses serialization {array.stype!r:.40}; expected {NUMPY_STYPE}")
    if array.dtype != str(dtype) or tuple(array.shape) != shape:
        raise MalformedMessage(f"array '{name}' is {array.dtype!s:.40}{tuple(array.shape)!s:.80}, expected {dtype}{shape}")
    if len(array.data) > math.prod(shape) * dtype.itemsize + MAX_NPY_HEADER_BYTES:
        raise MalformedMessage(f"array '{name}' carries {len(array.data)} bytes, far beyond {dtype}{shape}")
    offset, fortran = _npy_payload(name, array.data, shape, dtype)
    values = np.frombuffer(array.data, dtype=dtype, offset=offset).reshape(shape, order="F" if fortran else "C")
    if values.dtype.kind in "fc" and not np.all(np.isfinite(values)):
        raise MalformedMessage(f"array '{name}' holds NaN or infinite values")
    return values


def decode_arrays(record: object, expected: dict[str, tuple[tuple[int, ...], np.dtype | str]]) -> dict[str, np.ndarray]:
    """All arrays of an ArrayRecord, which must hold exactly ``expected``'s keys, in its order."""
    if not isinstance(record, ArrayRecord):
        raise MalformedMessage(f"expected an ArrayRecord; found {type(record).__name__}")
    if list(record.keys()) != list(expected):
        raise MalformedMessage(f"{len(record)} arrays with keys unlike the global model's {len(expected)}")
    return {key: decode_array(key, record[key], shape, dtype) for key, (shape, dtype) in expected.items()}


def layout_of(record: ArrayRecord) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shape and dtype of each array of a trusted record (the global model), for :func:`decode_arrays`."""
    return {key: (tuple(record[key].shape), record[key].dtype) for key in record.keys()}


# Everything parsing a peer's fedguard-config text can raise: each becomes a MalformedMessage.
CONFIG_ERRORS = (ConfigError, OmegaConfBaseException, yaml.YAMLError, ValueError, TypeError)


@lru_cache(maxsize=8)
def _is_yaml_mapping(config_text: str) -> bool:
    """Whether the text parses to a YAML mapping, once per distinct text: every train and evaluate
    request carries the run's whole config, and pure-Python YAML took a client ~13 ms a message
    to re-read it. A text that fails to parse raises each time (lru_cache keeps no exceptions)."""
    return isinstance(yaml.safe_load(config_text), dict)


def parse_run_config(config_text: str) -> DictConfig:
    """The fedguard config a message carries, validated; MalformedMessage naming the key otherwise
    (never OmegaConf's own assertion on a scalar or a list)."""
    try:
        if not _is_yaml_mapping(config_text):
            raise MalformedMessage(f"'{protocol.FEDGUARD_CONFIG_KEY}' is not a YAML mapping")
        return cached_config_from_yaml(config_text)
    except CONFIG_ERRORS as err:
        raise MalformedMessage(f"'{protocol.FEDGUARD_CONFIG_KEY}' is not a valid fedguard config: {err}") from None

