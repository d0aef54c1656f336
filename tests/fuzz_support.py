"""Hypothesis strategies that mutate valid fedguard messages (shared by the fuzz tests).

Every generated object is a structurally valid Flower ``RecordDict``: the records hold
only value types Flower accepts, so what is fuzzed is fedguard's decoding, not Flower's
constructors. Mutations start from a valid message, so most cases are near misses (one
wrong shape, one NaN, one flipped byte) rather than noise the first check rejects.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# Cases per message type. The README's test command (and so CI) sets FEDGUARD_FUZZ_CASES=1000;
# the inner loop (`pytest -m "not simulation and not deployment"`) keeps the quick default.
# Derandomized either way: the first N cases are the same on every machine.
FUZZ_CASES = int(os.environ.get("FEDGUARD_FUZZ_CASES", "100"))
FUZZ_SETTINGS = settings(
    max_examples=FUZZ_CASES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
FULL_SUITE_CASES = 1000


def scaled_examples(full: int) -> int:
    """Examples for a property test: ``full`` in the full suite (FEDGUARD_FUZZ_CASES=1000, as CI
    runs it), proportionally fewer in the inner loop (at least 2), so the fast loop stays fast
    and CI keeps the whole search."""
    return max(2, round(full * min(FUZZ_CASES, FULL_SUITE_CASES) / FULL_SUITE_CASES))


INT64 = st.integers(-(2**63), 2**63 - 1)
EDGE_INTS = st.sampled_from([0, -1, 1, 2**31, 2**53 + 1, 2**63 - 1, -(2**63)])
INTS = st.one_of(EDGE_INTS, INT64, st.integers(-3, 1000))
FLOATS = st.one_of(st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e308, -0.0, 5e-324]), st.floats())
METRIC_VALUES = st.one_of(INTS, FLOATS, st.lists(INTS, max_size=3), st.lists(FLOATS, max_size=3))
CONFIG_VALUES = st.one_of(
    INTS, FLOATS, st.booleans(), st.text(max_size=20), st.binary(max_size=48),
    st.lists(INTS, max_size=4), st.lists(st.binary(max_size=48), max_size=4), st.lists(st.text(max_size=6), max_size=3),
)
DTYPES = st.sampled_from(["float64", "float16", "int32", "int64", "uint64", "uint8", "complex64", "bool"])


def npy_bytes(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=False)
    return buffer.getvalue()


def mutate_array(draw: Any, array: Array) -> Array:
    """One way a client (or server) could send a wrong array under a plausible name."""
    try:
        values = array.numpy()
    except Exception:  # noqa: BLE001 - already mutated into junk by an earlier draw; numpy raises many types
        values = np.zeros(3, dtype="float32")
    kind = draw(st.sampled_from([
        "nonfinite", "shape", "dtype", "declared_huge", "junk", "flip", "truncate", "pad", "header_lie",
        "stype", "extreme", "far_beyond", "scalar", "negative_dims",
    ]))
    if kind == "nonfinite" and values.size and values.dtype.kind == "f":
        bad = values.astype(values.dtype).copy()
        bad.flat[draw(st.integers(0, values.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        return Array(bad)
    if kind == "shape":
        return Array(values.reshape(-1)[: draw(st.integers(0, values.size))].copy())
    if kind == "dtype":
        return Array(values.astype(draw(DTYPES)))
    if kind == "declared_huge":
        return Array(dtype=array.dtype, shape=(10**12,), stype=array.stype, data=array.data)
    if kind == "junk":
        return Array(dtype=array.dtype, shape=tuple(array.shape), stype=array.stype, data=draw(st.binary(max_size=400)))
    if kind == "flip" and array.data:
        data = bytearray(array.data)
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return Array(dtype=array.dtype, shape=tuple(array.shape), stype=array.stype, data=bytes(data))
    if kind == "truncate":
        cut = draw(st.integers(0, max(len(array.data) - 1, 0)))
        return Array(dtype=array.dtype, shape=tuple(array.shape), stype=array.stype, data=array.data[:cut])
    if kind == "pad":
        return Array(dtype=array.dtype, shape=tuple(array.shape), stype=array.stype,
                     data=array.data + draw(st.binary(min_size=1, max_size=64)))
    if kind == "header_lie":
        lie = np.zeros(draw(st.integers(0, 2 * max(values.size, 1))), dtype=draw(DTYPES))
        return Array(dtype=array.dtype, shape=tuple(array.shape), stype=array.stype, data=npy_bytes(lie))
    if kind == "stype":
        return Array(dtype=array.dtype, shape=tuple(array.shape), stype=draw(st.text(max_size=12)), data=array.data)
    if kind == "extreme" and values.dtype.kind == "f":
        # np.asarray: a 0-d array (an earlier "scalar" draw) times a float is a numpy scalar, not an ndarray.
        return Array(np.asarray((values.astype(np.float64) * 1e300).astype(values.dtype)))
    if kind == "far_beyond":
        return Array(np.zeros(draw(st.sampled_from([10**5, 10**6])), dtype=values.dtype))
    if kind == "scalar":
        return Array(np.asarray(draw(st.floats()), dtype="float32"))
    return Array(dtype=array.dtype, shape=(-1, *tuple(array.shape)), stype=array.stype, data=array.data)


def mutate_array_record(draw: Any, record: ArrayRecord) -> ArrayRecord:
    keys = list(record.keys())
    out = {key: record[key] for key in keys}
    kind = draw(st.sampled_from(["array", "array", "array", "drop", "add", "rename", "reorder"]))
    if kind == "array" and keys:
        key = draw(st.sampled_from(keys))
        out[key] = mutate_array(draw, record[key])
    elif kind == "drop" and keys:
        del out[draw(st.sampled_from(keys))]
    elif kind == "add":
        out[draw(st.text(min_size=1, max_size=10))] = Array(np.zeros(draw(st.integers(0, 5)), dtype="float32"))
    elif kind == "rename" and keys:
        key = draw(st.sampled_from(keys))
        out[key + draw(st.text(min_size=1, max_size=3))] = out.pop(key)
    elif keys:
        out = dict(reversed(list(out.items())))
    return ArrayRecord(out) if out else ArrayRecord()


def mutate_scalar_record(draw: Any, record: MetricRecord | ConfigRecord, known: list[str]) -> MetricRecord | ConfigRecord:
    """Drop, add, or retype one key of a MetricRecord/ConfigRecord (values stay Flower-legal)."""
    kind_of = type(record)
    values = METRIC_VALUES if kind_of is MetricRecord else CONFIG_VALUES
    out = dict(record)
    kind = draw(st.sampled_from(["set", "set", "set", "drop", "add"]))
    if kind == "set":
        out[draw(st.sampled_from(known + list(out) or ["x"]))] = draw(values)
    elif kind == "drop" and out:
        del out[draw(st.sampled_from(list(out)))]
    else:
        out[draw(st.text(min_size=1, max_size=12))] = draw(values)
    return kind_of(out)


def random_record(draw: Any) -> ArrayRecord | MetricRecord | ConfigRecord:
    kind = draw(st.sampled_from(["array", "metric", "config"]))
    if kind == "array":
        return ArrayRecord({"x": Array(np.zeros(draw(st.integers(0, 4)), dtype="float32"))})
    if kind == "metric":
        return MetricRecord(draw(st.dictionaries(st.text(max_size=8), METRIC_VALUES, max_size=3)))
    return ConfigRecord(draw(st.dictionaries(st.text(max_size=8), CONFIG_VALUES, max_size=3)))


def mutate_content(draw: Any, content: RecordDict, known_keys: dict[str, list[str]], rounds: int = 3) -> RecordDict:
    """Apply 1..``rounds`` mutations to a copy of ``content``; ``known_keys`` lists each record's keys."""
    out = {name: content[name] for name in content.keys()}
    for _ in range(draw(st.integers(1, rounds))):
        names = list(out)
        kind = draw(st.sampled_from(["edit", "edit", "edit", "edit", "drop", "extra", "retype"]))
        if kind == "edit" and names:
            name = draw(st.sampled_from(names))
            record = out[name]
            if isinstance(record, ArrayRecord):
                out[name] = mutate_array_record(draw, record)
            else:
                out[name] = mutate_scalar_record(draw, record, known_keys.get(name, []))
        elif kind == "drop" and names:
            del out[draw(st.sampled_from(names))]
        elif kind == "extra":
            out[draw(st.sampled_from([*known_keys, "extra", ""]))] = random_record(draw)
        elif names:
            out[draw(st.sampled_from(names))] = random_record(draw)
    return RecordDict(out)


def snapshot(record_dict: RecordDict) -> dict[str, Any]:
    """A comparable copy of a RecordDict (array bytes, scalar values), to prove nothing changed."""
    shot: dict[str, Any] = {}
    for name in record_dict.keys():
        record = record_dict[name]
        if isinstance(record, ArrayRecord):
            shot[name] = {k: (record[k].dtype, tuple(record[k].shape), record[k].data) for k in record.keys()}
        else:
            shot[name] = {k: repr(v) for k, v in record.items()}
    return shot
