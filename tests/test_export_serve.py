"""From trained to served: `fedguard export` (model + normalization + model card, refused when
the audit fails) and `fedguard serve` (a real uvicorn process on loopback, every bad input
answered with a 4xx naming the field)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.cli_support import FEDGUARD, fedguard

# Exported and eager PyTorch models run the same float32 ops on the same raw inputs.
TOLERANCE = 1e-4
MODELS = ("logreg", "mlp", "cnn")


def fake_run(tmp: Path, compose, overrides: list[str]) -> Path:
    """A run directory with random weights saved through save_checkpoint: export without training."""
    from fedguard.clients.datasets import expected_layout
    from fedguard.clients.models import build_model
    from fedguard.conf.run_config import config_to_yaml
    from fedguard.server.checkpoint import save_checkpoint

    cfg = compose(overrides)
    shape, classes = expected_layout(cfg.dataset)
    torch.manual_seed(0)
    model = build_model(cfg.model, shape, classes)
    run = tmp / "run"
    save_checkpoint(run / "checkpoints" / "final.pt", model_state=model.state_dict(), server_round=1,
                    config_yaml=config_to_yaml(cfg), input_shape=shape, num_classes=classes, metrics={})
    (run / "summary.json").write_text(json.dumps({"rounds": 1, "final": {"accuracy": 0.1, "loss": 2.3}}))
    return run


def test_raw_test_split_normalizes_to_what_the_loader_returns(compose):
    from fedguard.clients.datasets import load_dataset, raw_test_split

    for dataset in ("digits", "breast_cancer"):
        cfg = compose([f"dataset={dataset}"])
        raw, labels, norm = raw_test_split(cfg.dataset, int(cfg.seed))
        bundle = load_dataset(cfg.dataset, int(cfg.seed))
        np.testing.assert_allclose(norm.apply(raw), bundle.test_x, atol=1e-5)
        np.testing.assert_array_equal(labels, bundle.test_y)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
@pytest.mark.parametrize("model_name", MODELS)
def test_export_round_trip_each_model(tmp_path, compose, model_name, fmt):
    from fedguard.clients.datasets import raw_test_split
    from fedguard.server.checkpoint import load_global_model
    from fedguard.server.export import export_run, load_exported, missing_onnx_packages

    if fmt == "onnx" and missing_onnx_packages():  # they come with .[test]; a bare install may lack them
        pytest.skip(f"ONNX export needs {missing_onnx_packages()} (pip install 'fedguard[serve]')")

    run = fake_run(tmp_path, compose, ["dataset=digits", f"model={model_name}"])
    result = export_run(run, fmt, tmp_path / "out")
    cfg = compose(["dataset=digits"])
    raw, _, norm = raw_test_split(cfg.dataset, int(cfg.seed))
    model = load_global_model(run / "checkpoints" / "final.pt")
    with torch.inference_mode():
        reference = model(torch.from_numpy(norm.apply(raw))).numpy()
    exported = load_exported(result.model_path, fmt)(raw.astype(np.float32))
    assert np.max(np.abs(exported - reference)) <= TOLERANCE
    card = json.loads((tmp_path / "out" / "model_card.json").read_text())
    assert card["export"]["max_abs_diff_logits"] <= TOLERANCE
    assert card["export"]["test_examples"] == len(raw) == 360
    assert card["contract"]["input_shape"] == [1, 8, 8] and card["contract"]["raw_range"] == [0.0, 16.0]
    assert card["parameters"] == sum(p.numel() for p in model.parameters())
    assert card["privacy"]["audit"] is None  # privacy=none: not refused, nothing to audit
    markdown = (tmp_path / "out" / "MODEL_CARD.md").read_text()
    assert markdown.splitlines()[0].startswith("No differential privacy")
    assert "audit: not applicable" in markdown


def test_onnx_missing_packages_give_one_clear_message(tmp_path, compose, monkeypatch):
    from fedguard.server import export

    monkeypatch.setattr(export, "missing_onnx_packages", lambda: ["onnxscript"])
    run = fake_run(tmp_path, compose, ["dataset=digits", "model=logreg"])
    with pytest.raises(export.ExportError, match="onnxscript"):
        export.export_run(run, "onnx", tmp_path / "out")


def test_card_names_the_observer_of_each_level(compose):
    from fedguard.server.model_card import CLIENT_OBSERVER, SAMPLE_OBSERVER, PrivacySection, headline
    from fedguard.server.privacy_card import guarantees_from_summary

    cfg = compose(["privacy=sample_and_client_dp", "privacy.client_sampling=fixed"])
    summary = {"clients": {"0": {"epsilon": 2.0, "delta": 1e-5, "accountant": "rdp"},
                           "1": {"epsilon": 3.0, "delta": 1e-5, "accountant": "rdp"}},
               "max_epsilon": 3.0, "mean_epsilon": 2.5,
               "federation": {"epsilon": 4.5, "delta": 1e-6, "accountant": "rdp", "sampling": "fixed"}}
    sample, client = guarantees_from_summary(cfg, summary)
    assert (sample.level, sample.epsilon, sample.epsilon_mean, sample.delta) == ("sample", 3.0, 2.5, 1e-5)
    assert sample.observer.startswith(SAMPLE_OBSERVER)
    assert (client.level, client.epsilon, client.delta, client.observer) == ("client", 4.5, 1e-6, CLIENT_OBSERVER)
    assert client.adjacency.startswith("replace one site")
    line = headline(PrivacySection("sample_and_client_dp", "", (sample, client), False, None))
    assert "per training record" in line and "per site" in line


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("dp") / "run"
    fedguard("simulate", "simulation=tiny", "simulation.rounds=1", "dataset=digits", "model=mlp",
             "privacy=sample_dp", "progress=false", f"hydra.run.dir={run}", timeout=600)
    return run


def _export_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*FEDGUARD, "export", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.simulation
def test_card_of_a_dp_run_matches_summary_and_audit(dp_run, tmp_path):
    from fedguard.privacy.audit.runner import run_audit
    from fedguard.privacy.signing import KeyRegistry

    proc = _export_cli(str(dp_run), "--format", "torchscript", "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    card = json.loads((tmp_path / "out" / "model_card.json").read_text())
    summary = json.loads((dp_run / "summary.json").read_text())
    audit = run_audit(dp_run)
    privacy = card["privacy"]
    assert privacy["mode"] == "sample_dp" and privacy["secure_aggregation"] is False
    (sample,) = privacy["guarantees"]
    assert sample["level"] == "sample"
    assert sample["epsilon"] == summary["privacy"]["max_epsilon"]
    assert sample["epsilon_mean"] == summary["privacy"]["mean_epsilon"]
    assert sample["delta"] == next(iter(summary["privacy"]["clients"].values()))["delta"]
    assert "per training record" in sample["observer"] and "add/remove one record" in sample["adjacency"]
    assert privacy["audit"]["passed"] is True and privacy["audit"]["verdict"] == audit.verdict
    assert privacy["audit"]["ledger_id"] == audit.verification.ledger_id
    last_line = (dp_run / "ledger.jsonl").read_bytes().rstrip(b"\n").rsplit(b"\n", 1)[-1]
    assert privacy["audit"]["ledger_head_sha256"] == hashlib.sha256(last_line).hexdigest()
    assert privacy["audit"]["key_ids"] == KeyRegistry.load(dp_run / "keys").parties()
    assert card["metrics"]["test_accuracy"] == summary["final"]["accuracy"]
    assert card["headline"].startswith("Differentially private model")
    assert (tmp_path / "out" / "MODEL_CARD.md").read_text().splitlines()[0] == card["headline"]
    assert "max |logit diff|" in proc.stdout


@pytest.mark.simulation
def test_tampered_ledger_refuses_export_unless_allowed(dp_run, tmp_path):
    from fedguard.server.model_card import UNAUDITED_BANNER

    run = tmp_path / "run"
    shutil.copytree(dp_run, run)
    ledger = bytearray((run / "ledger.jsonl").read_bytes())
    position = ledger.index(b'"epsilon":') + len(b'"epsilon":')
    ledger[position] = ord("9") if ledger[position] != ord("9") else ord("8")  # one byte of a recorded epsilon
    (run / "ledger.jsonl").write_bytes(bytes(ledger))
    refused = _export_cli(str(run), "--out", str(tmp_path / "refused"))
    assert refused.returncode != 0
    assert refused.stdout.count("\n") == 1 and "refusing to export" in refused.stdout, refused.stdout
    assert not (tmp_path / "refused" / "model_card.json").exists()
    allowed = _export_cli(str(run), "--out", str(tmp_path / "out"), "--allow-unaudited")
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert (tmp_path / "out" / "MODEL_CARD.md").read_text().splitlines()[0] == UNAUDITED_BANNER
    card = json.loads((tmp_path / "out" / "model_card.json").read_text())
    assert card["headline"] == UNAUDITED_BANNER and card["privacy"]["audit"]["passed"] is False


# --- serving -------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`fedguard serve` in a subprocess on loopback; always stopped by the fixture's finally."""

    def __init__(self, model_dir: Path, *extra: str) -> None:
        import httpx

        self.port = _free_port()
        self.proc = subprocess.Popen(
            [*FEDGUARD, "serve", str(model_dir), "--port", str(self.port), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"fedguard serve exited: {self.proc.stdout.read()}")
            try:
                if self.client.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError("fedguard serve did not become healthy in 120 s")

    def stop(self) -> tuple[int, str]:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return self.proc.returncode, out


@pytest.fixture(scope="module")
def image_server(tmp_path_factory, compose):
    from fedguard.server.export import export_run

    tmp = tmp_path_factory.mktemp("serve-image")
    export_run(fake_run(tmp, compose, ["dataset=digits", "model=cnn"]), "torchscript", tmp / "model")
    server = Server(tmp / "model", "--max-batch", "8", "--max-body-bytes", "20000")
    try:
        yield server
    finally:
        code, out = server.stop()
    assert code == 0, out  # SIGTERM: uvicorn drains open requests and the process exits 0
    assert "received SIGTERM" in out and "Application shutdown complete" in out and "stopped after a signal" in out


@pytest.fixture(scope="module")
def table_server(tmp_path_factory, compose):
    from fedguard.server.export import export_run

    tmp = tmp_path_factory.mktemp("serve-table")
    export_run(fake_run(tmp, compose, ["dataset=breast_cancer", "model=logreg"]), "torchscript", tmp / "model")
    server = Server(tmp / "model")
    try:
        yield server
    finally:
        server.stop()


def _png(pixels: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), mode="L").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.deployment  # starts a separate process
def test_serve_answers_predictions_card_and_health(image_server):
    image = np.random.default_rng(0).integers(0, 17, size=(8, 8)).tolist()
    reply = image_server.client.post("/predict", json={"inputs": [image, [image]]})  # H x W and C x H x W
    assert reply.status_code == 200, reply.text
    first, second = reply.json()["predictions"]
    assert first == second and first["class_name"] == str(first["class_index"])
    assert len(first["probabilities"]) == 10 and abs(sum(first["probabilities"]) - 1) < 1e-4
    png = image_server.client.post("/predict", json={"images_png": [_png(np.full((8, 8), 255))]})
    assert png.status_code == 200, png.text
    assert image_server.client.get("/model-card").json()["contract"]["input_shape"] == [1, 8, 8]
    assert image_server.client.get("/health").json()["status"] == "ok"


IMAGE = [[0.0] * 8 for _ in range(8)]
BAD_IMAGE_REQUESTS = {
    "wrong image size": ({"inputs": [[[0.0] * 8 for _ in range(7)]]}, ["body", "inputs", 0]),
    "wrong row width (C x H x W)": ({"inputs": [[[[0.0] * 7] + IMAGE[1:]]]}, ["body", "inputs", 0, 0, 0]),
    "two channels": ({"inputs": [[IMAGE, IMAGE]]}, ["body", "inputs", 0]),
    "string value": ({"inputs": [[["x"] * 8] + IMAGE[1:]]}, ["body", "inputs", 0, 0, 0]),
    "bool value": ({"inputs": [[IMAGE[0], [True] * 8] + IMAGE[2:]]}, ["body", "inputs", 0, 1, 0]),
    "a number as the image": ({"inputs": [3.0]}, ["body", "inputs", 0]),
    "empty batch": ({"inputs": []}, ["body", "inputs"]),
    "batch over the limit": ({"inputs": [IMAGE] * 9}, ["body", "inputs"]),
    "not a list": ({"inputs": "abc"}, ["body", "inputs"]),
    "no inputs field": ({"rows": [IMAGE]}, ["body"]),
    "not an object": ([IMAGE], ["body"]),
    "bad png": ({"images_png": ["bm90IGEgcG5n"]}, ["body", "images_png", 0]),
    "png of the wrong size": ({"images_png": [_png(np.zeros((9, 8)))]}, ["body", "images_png", 0]),
}


@pytest.mark.deployment  # starts a separate process
@pytest.mark.parametrize("case", sorted(BAD_IMAGE_REQUESTS))
def test_serve_rejects_bad_image_input_with_422(image_server, case):
    body, loc = BAD_IMAGE_REQUESTS[case]
    reply = image_server.client.post("/predict", json=body)
    assert reply.status_code == 422, reply.text
    assert reply.json()["detail"][0]["loc"] == loc


@pytest.mark.parametrize("raw", [b'{"inputs": [[[NaN, 0, 0, 0, 0, 0, 0, 0]]]}', b'{"inputs": [[[Infinity]]]}',
                                 b"{not json", b"[" * 15000, b"\xff\xfe"])
@pytest.mark.deployment  # starts a separate process
def test_serve_rejects_nan_inf_and_broken_json(image_server, raw):
    reply = image_server.client.post("/predict", content=raw, headers={"content-type": "application/json"})
    assert reply.status_code == 422, reply.text
    assert reply.json()["detail"][0]["loc"][0] == "body"


@pytest.mark.deployment  # starts a separate process
def test_serve_limits_body_size(image_server):
    reply = image_server.client.post("/predict", content=b" " * 20001, headers={"content-type": "application/json"})
    assert reply.status_code == 413 and reply.json()["detail"][0]["loc"] == ["body"]


@pytest.mark.deployment  # starts a separate process
def test_serve_tabular_rows_by_position_and_by_name(table_server):
    card = table_server.client.get("/model-card").json()
    names = card["contract"]["feature_names"]
    assert len(names) == 30
    row = [1.0] * 30
    by_name = {name: 1.0 for name in names}
    reply = table_server.client.post("/predict", json={"inputs": [row, by_name]})
    assert reply.status_code == 200, reply.text
    first, second = reply.json()["predictions"]
    assert first == second and first["class_name"] in ("malignant", "benign")
    bad = {
        "short row": ({"inputs": [[1.0] * 29]}, ["body", "inputs", 0]),
        "unknown name": ({"inputs": [{**by_name, "colour": 1.0}]}, ["body", "inputs", 0]),
        "missing name": ({"inputs": [{k: v for k, v in by_name.items() if k != names[3]}]}, ["body", "inputs", 0]),
        "null value": ({"inputs": [{**by_name, names[0]: None}]}, ["body", "inputs", 0, names[0]]),
        "png to a table": ({"images_png": ["x"]}, ["body", "images_png"]),
    }
    for case, (body, loc) in bad.items():
        reply = table_server.client.post("/predict", json=body)
        assert reply.status_code == 422, (case, reply.text)
        assert reply.json()["detail"][0]["loc"] == loc, case


def test_card_gives_cohort_knowers_their_own_figure_and_says_when_none_holds(compose):
    from fedguard.server.model_card import CLIENT_OBSERVER
    from fedguard.server.privacy_card import guarantees_from_summary

    cfg = compose(["privacy=client_dp"])
    federation = {"epsilon": 2.0, "delta": 1e-5, "accountant": "rdp", "sampling": "poisson",
                  "epsilon_by_observer": {"server_operator": None, "knows_cohorts": 7.5, "model_users_and_other_sites": 2.0}}
    users, knowers = guarantees_from_summary(cfg, {"federation": federation})
    assert users.epsilon == 2.0 and users.observer.startswith(CLIENT_OBSERVER)
    assert "server operator: none holds" in users.observer
    assert knowers.epsilon == 7.5 and "knows the cohorts" in knowers.observer
