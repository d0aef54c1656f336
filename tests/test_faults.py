"""Faults in simulation: bad local data on one site, a client that crashes or hangs
mid-training, mid-protocol (a SecAgg+ stage) or mid-evaluation.

Each test runs fedguard's real ServerApp and, for every site, fedguard's real ClientApp
inside a test-only ClientApp that injects one fault into one chosen partition (as
simulations/bench_poisoning.py injects its attack). The fault spec reaches the Ray
workers (other processes) through the environment, which they inherit from this one.

Properties: the run completes with the other clients; the faulty client is counted as
failed, and the server says why in one log line; the global model is exactly the
example-weighted mean of the survivors' replies (so nothing of the faulty client's is in
it, not even a late reply; under SecAgg+, exactly the clients that sent masked inputs);
a hung client holds up neither the round nor the shutdown.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedguard.clients.wire import protocol
from fedguard.clients.app import SIMULATION_ROSTER
from fedguard.clients.app import app as fedguard_client
from fedguard.clients.secagg_identity import provision_rosters
from fedguard.clients.datasets import FASHION_MNIST_FILES, IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC
from fedguard.clients.site import DATA_ROOT_KEY, PARTITION_ID_KEY, SECAGG_ROSTER_KEY, STATE_DIR_KEY
from fedguard.clients.secure_aggregation import ENCODING_STATE_KEY, INPUT_ARRAY, INPUT_STATE_KEY, WEIGHT
from fedguard.conf.run_config import config_to_yaml
from fedguard.server.app import main as fedguard_server_main
from fedguard.server.checkpoint import load_global_model
from fedguard.simulations.simulate import backend_config, launch

pytestmark = pytest.mark.simulation

FAULT_ENV = "FEDGUARD_TEST_FAULT"
NUM_CLIENTS = 3
FAULTY = 1  # the partition the fault hits; the others must carry the round
BASE = [
    "model=logreg", f"simulation.num_clients={NUM_CLIENTS}", "simulation.rounds=1",
    "simulation.min_clients_per_round=2",
    "train.max_steps=2", "progress=false", "device=cpu", "log_level=WARNING",
]
# Seconds the warm-up may take: Ray starts the workers and each imports torch and fedguard.
WARM_UP_TIMEOUT = 240.0
WARM_UP_POLL = 0.2
# The hang tests' round timeout and how long after it the hung client answers: late, but it
# does answer, so Flower's engine can shut its worker down when the run ends. Warm, a round of
# 2 steps takes ~1 s, but a worker's first train request still loads its data and the DP and
# training modules; CI's 2-core machines saw that take over 5 s for all three clients at once.
# The tests do not time the server: they check that it closed the round (metrics.jsonl
# written) before the hung client woke up (its wake-up marker written).
ROUND_TIMEOUT = 15.0
HANG_PAST_TIMEOUT = 6.0
WOKE_MARKER = "woke-{partition}.time"
# Tiny Fashion-MNIST-format data (IDX files): examples per split, pixels per side.
GOOD_TRAIN, GOOD_TEST, FASHION_SIDE, FASHION_CLASSES = 90, 30, 28, 10
WRONG_SIDE = 20
DATA_SEED = 0
OUT_OF_RANGE_LABEL = FASHION_CLASSES + 2
# FedAvg's mean is computed in float32 by Flower; ours in float64.
MEAN_TOLERANCE = 1e-5

fault_client = ClientApp()
fault_server = ServerApp()


@fault_server.main()
def _warm_then_serve(grid: Grid, context: Context) -> None:
    """Wake every simulated client, then run fedguard's real ServerApp main.

    A cold Ray worker starts and imports torch on its first message, which on a small
    machine takes longer than the hang test's round timeout; the warm-up (one query per
    client) keeps that out of the rounds, so their timeouts measure the fault.
    """
    deadline = time.monotonic() + WARM_UP_TIMEOUT
    expected = int(_spec().get("clients", NUM_CLIENTS))
    while len(nodes := list(grid.get_node_ids())) < expected and time.monotonic() < deadline:
        time.sleep(WARM_UP_POLL)
    wake = [Message(RecordDict(), dst_node_id=node, message_type="query") for node in nodes]
    grid.send_and_receive(wake, timeout=max(deadline - time.monotonic(), 0.0))
    fedguard_server_main(grid, context)


@fault_client.query()
def _awake(msg: Message, context: Context) -> Message:
    return Message(RecordDict(), reply_to=msg)


def _spec() -> dict[str, Any]:
    return json.loads(os.environ.get(FAULT_ENV, "{}") or "{}")


def _record_reply(spec: dict[str, Any], partition: int, reply: Message, late: bool) -> None:
    """Keep what a client sent (arrays and example count), for the test to recompute the aggregate."""
    if reply.has_error() or protocol.ARRAYS_KEY not in reply.content:
        return
    arrays = reply.content[protocol.ARRAYS_KEY]
    examples = float(reply.content[protocol.METRICS_KEY][protocol.NUM_EXAMPLES_KEY])
    tag = "late" if late else "sent"
    np.savez(Path(spec["replies"]) / f"{tag}-{partition}.npz", __examples__=np.float64(examples),
             **{key: arrays[key].numpy() for key in arrays.keys()})


@fault_client.train()
def _faulty_train(msg: Message, context: Context) -> Message:
    """fedguard's real train handler (mods included), with the spec's fault on partition FAULTY."""
    spec = _spec()
    partition = int(context.node_config[PARTITION_ID_KEY])
    fault = _fault_for(context, "train")
    if fault == "bad-data":
        context.node_config[DATA_ROOT_KEY] = spec["bad_root"]
    _site_dirs(context)
    reply = fedguard_client(msg, context)
    if fault == "crash":
        # Trained, then died before replying: the work done must not reach the server.
        raise RuntimeError(f"partition {partition}: simulated crash in the middle of local training")
    if fault == "hang":
        _sleep_then_mark_waking(spec, partition)
    _record_reply(spec, partition, reply, late=fault == "hang")
    if INPUT_STATE_KEY in context.state:  # under SecAgg+ the update stays on the client until masked
        held = context.state[INPUT_STATE_KEY][INPUT_ARRAY].numpy()
        weight = float(context.state[ENCODING_STATE_KEY][WEIGHT])
        np.savez(Path(spec["replies"]) / f"held-{partition}.npz", update=held, weight=weight)
    return reply


def _fault_for(context: Context, phase: str) -> str | None:
    spec = _spec()
    faulty = int(context.node_config[PARTITION_ID_KEY]) == FAULTY and spec.get("phase", "train") == phase
    return spec.get("fault") if faulty else None


def _inject(fault: str | None, where: str) -> None:
    if fault == "crash":
        raise RuntimeError(f"partition {FAULTY}: simulated crash in the middle of {where}")
    if fault == "hang":
        _sleep_then_mark_waking(_spec(), FAULTY)


def _sleep_then_mark_waking(spec: dict[str, Any], partition: int) -> None:
    """Hang, then leave the wall-clock time this client woke up (written before any late reply)."""
    time.sleep(float(spec["hang_seconds"]))
    (Path(spec["replies"]) / WOKE_MARKER.format(partition=partition)).write_text(repr(time.time()))


def _site_dirs(context: Context) -> None:
    """Each virtual site's state dir and the SecAgg+ roster, as `fedguard simulate` sets them."""
    root = _spec().get("site_root")
    if root and not context.node_config.get(STATE_DIR_KEY):
        context.node_config[STATE_DIR_KEY] = str(Path(root) / f"partition-{context.node_config[PARTITION_ID_KEY]}")
        context.node_config[SECAGG_ROSTER_KEY] = str(Path(root) / SIMULATION_ROSTER)


@fault_client.train("secagg")
def _faulty_stage(msg: Message, context: Context) -> Message:
    """fedguard's real SecAgg+ stage handler; the fault hits partition FAULTY at the spec's stage."""
    stage = str(msg.content[protocol.SECAGG_KEY]["stage"])
    _site_dirs(context)
    reply = fedguard_client(msg, context)
    _inject(_fault_for(context, stage), f"the secure aggregation {stage} stage")
    return reply


@fault_client.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    """fedguard's real evaluate handler; every reply is kept so the test can recompute the average."""
    reply = fedguard_client(msg, context)
    fault = _fault_for(context, "evaluate")
    _inject(fault, "evaluation")
    if not reply.has_error():
        metrics = reply.content[protocol.METRICS_KEY]
        kept = {key: float(metrics[key]) for key in (protocol.NUM_EXAMPLES_KEY, protocol.EVAL_ACCURACY_KEY)}
        tag = "late" if fault == "hang" else "sent"
        partition = int(context.node_config[PARTITION_ID_KEY])
        (Path(_spec()["replies"]) / f"eval-{tag}-{partition}.json").write_text(json.dumps(kept))
    return reply


def _write_idx(folder: Path, stem: str, magic: int, values: np.ndarray) -> None:
    header = struct.pack(">II", magic, len(values))
    if magic == IDX_IMAGES_MAGIC:
        header += struct.pack(">II", *values.shape[1:])
    with gzip.open(folder / f"{stem}.gz", "wb") as handle:
        handle.write(header + values.astype(np.uint8).tobytes())


def _fashion_folder(folder: Path, side: int = FASHION_SIDE, label_shift: int = 0) -> Path:
    """Four IDX files in Fashion-MNIST's format: random images, ``side`` pixels square, labels + ``label_shift``."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(DATA_SEED)
    for split, count in (("train", GOOD_TRAIN), ("test", GOOD_TEST)):
        prefix = "train" if split == "train" else "test"
        images = rng.integers(0, 256, size=(count, side, side))
        labels = np.arange(count) % FASHION_CLASSES + label_shift
        _write_idx(folder, FASHION_MNIST_FILES[f"{prefix}_images"], IDX_IMAGES_MAGIC, images)
        _write_idx(folder, FASHION_MNIST_FILES[f"{prefix}_labels"], IDX_LABELS_MAGIC, labels)
    return folder


def _simulate(
    compose, tmp_path: Path, overrides: list[str], spec: dict[str, Any], monkeypatch, clients: int = NUM_CLIENTS
) -> dict[str, Any]:
    """One fedguard run in Flower's simulation engine with the test ClientApp; returns what it wrote."""
    cfg = compose([*BASE, f"simulation.num_clients={clients}", *overrides])
    run_dir, replies, sites = tmp_path / "run", tmp_path / "replies", tmp_path / "sites"
    replies.mkdir()
    if cfg.secure_agg.mode != "off":  # the sites' identity keys and the roster they pin (out of band on real sites)
        provision_rosters({f"partition-{i}": sites / f"partition-{i}" for i in range(clients)},
                          shared_roster=sites / SIMULATION_ROSTER)
        spec = {**spec, "site_root": str(sites)}
    monkeypatch.setenv(FAULT_ENV, json.dumps({**spec, "replies": str(replies), "clients": clients}))
    run_config = {protocol.RUN_CONFIG_FEDGUARD: config_to_yaml(cfg), protocol.RUN_CONFIG_RUN_DIR: str(run_dir)}
    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    started = time.monotonic()
    launch(fault_server, fault_client, clients, backend_config(cfg), context)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "summary": summary,
        "rounds": [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()],
        "sent": {int(p.stem.split("-")[1]): dict(np.load(p)) for p in replies.glob("sent-*.npz")},
        "late": {int(p.stem.split("-")[1]): dict(np.load(p)) for p in replies.glob("late-*.npz")},
        "held": {int(p.stem.split("-")[1]): dict(np.load(p)) for p in replies.glob("held-*.npz")},
        "evaluated": {int(p.stem.split("-")[2]): json.loads(p.read_text()) for p in replies.glob("eval-sent-*.json")},
        "evaluated_late": {int(p.stem.split("-")[2]) for p in replies.glob("eval-late-*.json")},
        "seconds": time.monotonic() - started,
        # When the last round's line was written, and when each hung client woke up.
        "round_closed_at": (run_dir / "metrics.jsonl").stat().st_mtime,
        "woke_at": {int(p.name.split("-")[1].split(".")[0]): float(p.read_text()) for p in replies.glob("woke-*.time")},
    }


def _closed_before_the_hung_client_woke(run: dict[str, Any]) -> bool:
    """The server wrote the round's result before the hung client even woke: it did not wait."""
    return run["woke_at"].keys() == {FAULTY} and run["round_closed_at"] < run["woke_at"][FAULTY]


def _assert_model_is_mean_of(run: dict[str, Any], partitions: set[int]) -> None:
    """The global model after round 1 is the example-weighted mean of exactly these partitions' replies."""
    assert set(run["sent"]) == partitions
    final = load_global_model(run["summary"]["checkpoint"]).state_dict()
    weights = {p: float(run["sent"][p]["__examples__"]) for p in partitions}
    for key, tensor in final.items():
        mean = sum(weights[p] * run["sent"][p][key].astype(np.float64) for p in partitions) / sum(weights.values())
        np.testing.assert_allclose(tensor.numpy(), mean, atol=MEAN_TOLERANCE, err_msg=key)


def _assert_secure_sum_is_mean_of(run: dict[str, Any], cfg, partitions: set[int]) -> None:
    """Global model after round 1 = initial model + the example-weighted mean of these partitions' held updates."""
    from fedguard.clients.datasets import load_dataset
    from fedguard.clients.models import build_model
    import torch

    held = run["held"]
    assert partitions <= set(held)
    bundle = load_dataset(cfg.dataset, cfg.seed)
    torch.manual_seed(cfg.seed)
    initial = build_model(cfg.model, bundle.input_shape, bundle.num_classes).state_dict()
    final = load_global_model(run["summary"]["checkpoint"]).state_dict()
    weights = {p: float(held[p]["weight"]) for p in partitions}
    mean = sum(weights[p] * held[p]["update"].astype(np.float64) for p in partitions) / sum(weights.values())
    offset = 0
    for key, tensor in final.items():
        size = tensor.numel()
        expected = initial[key].numpy().astype(np.float64) + mean[offset:offset + size].reshape(tensor.shape)
        np.testing.assert_allclose(tensor.numpy(), expected, atol=MEAN_TOLERANCE, err_msg=key)
        offset += size
    assert offset == mean.size


def _server_lines(caplog, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("fedguard.server") and needle in r.getMessage()]


@pytest.mark.parametrize(
    ("side", "label_shift", "reason"),
    [
        (WRONG_SIDE, 0, f"examples are {WRONG_SIDE}x{WRONG_SIDE}, the dataset needs {FASHION_SIDE}x{FASHION_SIDE}"),
        # the server hears that labels are out of range, not how many (LocalDataError.public)
        (FASHION_SIDE, OUT_OF_RANGE_LABEL, f"labels outside 0..{FASHION_CLASSES - 1}"),
    ],
    ids=["wrong-image-size", "labels-out-of-range"],
)
def test_bad_local_data_is_one_clean_refusal(compose, tmp_path, monkeypatch, caplog, side, label_shift, reason):
    good = _fashion_folder(tmp_path / "fashion")
    bad = _fashion_folder(tmp_path / "bad-site", side=side, label_shift=label_shift)
    caplog.set_level(logging.WARNING)
    run = _simulate(compose, tmp_path, ["dataset=fashion_mnist", f"dataset.root={good}"],
                    {"fault": "bad-data", "bad_root": str(bad)}, monkeypatch)
    assert run["summary"]["stop_reason"] == "completed all rounds"
    (round_one,) = run["rounds"]
    assert round_one["clients_replied"] == NUM_CLIENTS - 1 and round_one["clients_failed"] == 1
    failures = _server_lines(caplog, "failed: LocalDataError")
    assert len(failures) == 1 and reason in failures[0], failures
    _assert_model_is_mean_of(run, set(range(NUM_CLIENTS)) - {FAULTY})


def test_client_crash_mid_training_fails_only_that_client(compose, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.WARNING)
    run = _simulate(compose, tmp_path, ["dataset=digits"], {"fault": "crash"}, monkeypatch)
    assert run["summary"]["stop_reason"] == "completed all rounds"
    (round_one,) = run["rounds"]
    assert round_one["clients_replied"] == NUM_CLIENTS - 1 and round_one["clients_failed"] == 1
    failures = _server_lines(caplog, "failed:")
    assert len(failures) == 1 and "simulated crash in the middle of local training" in failures[0], failures
    _assert_model_is_mean_of(run, set(range(NUM_CLIENTS)) - {FAULTY})


def test_hung_client_misses_the_round_and_does_not_hold_it(compose, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.WARNING)
    hang = ROUND_TIMEOUT + HANG_PAST_TIMEOUT
    run = _simulate(compose, tmp_path, ["dataset=digits", f"simulation.round_timeout={ROUND_TIMEOUT}"],
                    {"fault": "hang", "hang_seconds": hang}, monkeypatch)
    assert run["summary"]["stop_reason"] == "completed all rounds"
    (round_one,) = run["rounds"]
    assert round_one["clients_replied"] == NUM_CLIENTS - 1 and round_one["clients_failed"] == 1
    assert _closed_before_the_hung_client_woke(run), run["round_closed_at"]
    silent = _server_lines(caplog, "no reply within")
    assert len(silent) == 1 and f"1 of {NUM_CLIENTS} client(s)" in silent[0], silent
    # The late reply was computed and sent, and is not in the model.
    assert set(run["late"]) == {FAULTY}
    _assert_model_is_mean_of(run, set(range(NUM_CLIENTS)) - {FAULTY})


# SecAgg+ faults need 5 clients: with threshold 3 over a complete neighbour graph, every
# client's shares survive the loss of any one other client; and each site's own defaults
# (one colluder assumed among 5, so 2t > k + 1) accept k=4, t=3, where 4 sites at k=3, t=2 are refused.
SECAGG_CLIENTS = 5
STAGE_TIMEOUT = 5.0
SECAGG = ["secure_agg=secaggplus", "secure_agg.neighbours=4", "secure_agg.threshold=3",
          f"secure_agg.stage_timeout={STAGE_TIMEOUT}", "secure_agg.clip_range=8"]


@pytest.mark.parametrize(
    ("fault", "stage", "summed"),
    [("crash", "mask", SECAGG_CLIENTS - 1), ("hang", "unmask", SECAGG_CLIENTS)],
    ids=["crash-before-masked-input", "hang-after-masked-input"],
)
def test_secure_aggregation_survives_a_client_lost_mid_protocol(compose, tmp_path, monkeypatch, caplog, fault, stage,
                                                                  summed):
    """A client lost before its masked input leaves the sum; one lost after it stays in (its seed comes from its peers)."""
    caplog.set_level(logging.WARNING)
    hang = STAGE_TIMEOUT + HANG_PAST_TIMEOUT
    run = _simulate(compose, tmp_path, ["dataset=digits", *SECAGG], {"fault": fault, "phase": stage, "hang_seconds": hang},
                    monkeypatch, clients=SECAGG_CLIENTS)
    assert run["summary"]["stop_reason"] == "completed all rounds"
    (round_one,) = run["rounds"]
    assert round_one["clients_replied"] == summed
    _assert_secure_sum_is_mean_of(run, compose([*BASE, "dataset=digits"]),
                                  set(range(SECAGG_CLIENTS)) - ({FAULTY} if summed < SECAGG_CLIENTS else set()))
    dropped = _server_lines(caplog, f"secure aggregation {stage}")
    reason = "simulated crash" if fault == "crash" else "dropped out"
    assert dropped and any(reason in line for line in dropped), dropped
    if fault == "hang":
        assert _closed_before_the_hung_client_woke(run), run["round_closed_at"]


@pytest.mark.parametrize("fault", ["crash", "hang"])
def test_evaluation_goes_on_without_a_failed_client(compose, tmp_path, monkeypatch, caplog, fault):
    """The federated evaluation is the example-weighted mean of exactly the clients that answered in time."""
    caplog.set_level(logging.WARNING)
    hang = ROUND_TIMEOUT + HANG_PAST_TIMEOUT
    run = _simulate(compose, tmp_path,
                    ["dataset=digits", "evaluate.fraction_clients=1.0", f"simulation.round_timeout={ROUND_TIMEOUT}"],
                    {"fault": fault, "phase": "evaluate", "hang_seconds": hang}, monkeypatch)
    assert run["summary"]["stop_reason"] == "completed all rounds"
    (round_one,) = run["rounds"]
    assert round_one["clients_replied"] == NUM_CLIENTS
    answered = run["evaluated"]
    assert set(answered) == set(range(NUM_CLIENTS)) - {FAULTY}
    weights = {p: answered[p][protocol.NUM_EXAMPLES_KEY] for p in answered}
    mean = sum(weights[p] * answered[p][protocol.EVAL_ACCURACY_KEY] for p in answered) / sum(weights.values())
    assert round_one["federated_eval_accuracy"] == pytest.approx(mean, abs=MEAN_TOLERANCE)
    if fault == "crash":
        failed = _server_lines(caplog, "evaluation on client node")
        assert len(failed) == 1 and "simulated crash in the middle of evaluation" in failed[0], failed
    else:
        assert run["evaluated_late"] == {FAULTY}
        assert _closed_before_the_hung_client_woke(run), run["round_closed_at"]
        silent = _server_lines(caplog, "no reply within")
        assert len(silent) == 1 and f"1 of {NUM_CLIENTS} client(s)" in silent[0], silent
