"""Sample-level DP: cumulative accounting, calibration, clipping, state persistence, budgets."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict
from opacus.accountants import PRVAccountant, RDPAccountant

from fedguard.clients.app import load_local_data
from fedguard.clients.private_training import BudgetExhausted, PlainTrainer, SampleDPTrainer, build_trainer
from fedguard.clients.site import read_site_settings
from fedguard.clients.training import make_training_setup
from fedguard.conf import ConfigError, compose_config
from fedguard.privacy.accounting import calibrate_noise_multiplier, compute_epsilon
from fedguard.privacy.client_budget import STATE_KEY, ClientPrivacyState

DP = ["privacy=sample_dp"]


def _linear(in_features: int = 8, classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_features, classes))


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_calibrated_sigma_fits_the_whole_plan_and_is_tight():
    for accountant in ("rdp", "prv"):
        sigma = calibrate_noise_multiplier(
            target_epsilon=3.0, delta=1e-5, sample_rate=0.02, steps=2000, accountant=accountant
        )
        spent = compute_epsilon([(sigma, 0.02, 2000)], 1e-5, accountant).epsilon
        assert spent <= 3.0
        assert spent > 2.9  # not wastefully over-noised
        less_noise = compute_epsilon([(sigma * 0.97, 0.02, 2000)], 1e-5, accountant).epsilon
        assert less_noise > 3.0


def test_epsilon_matches_opacus_accountants_and_composes():
    history = [(1.1, 0.05, 100), (1.1, 0.05, 50), (0.9, 0.1, 30)]
    rdp = RDPAccountant()
    rdp.history = [(1.1, 0.05, 150), (0.9, 0.1, 30)]
    assert compute_epsilon(history, 1e-5, "rdp").epsilon == pytest.approx(rdp.get_epsilon(1e-5), rel=1e-12)
    prv = PRVAccountant()
    prv.history = [(1.1, 0.05, 150), (0.9, 0.1, 30)]
    assert compute_epsilon(history, 1e-5, "prv").epsilon == pytest.approx(prv.get_epsilon(1e-5), rel=1e-6)
    assert compute_epsilon(history[:1], 1e-5, "rdp").epsilon < compute_epsilon(history, 1e-5, "rdp").epsilon


def test_prv_falls_back_to_rdp_for_large_epsilon(caplog):
    history = [(0.3, 0.5, 2000)]  # epsilon in the hundreds: beyond PRV's reliable range
    report = compute_epsilon(history, 1e-5, "prv")
    assert report.accountant == "rdp"
    assert report.epsilon == pytest.approx(compute_epsilon(history, 1e-5, "rdp").epsilon)
    assert "RDP" in caplog.text


def test_privacy_state_round_trips_through_context_state():
    state = ClientPrivacyState(
        noise_multiplier=1.3, sample_rate=0.04, delta=1e-5, accountant="rdp", budget_epsilon=4.0,
        history=[(1.3, 0.04, 25), (1.3, 0.04, 25)], rounds_participated=2,
    )
    records = RecordDict({STATE_KEY: ConfigRecord(state.to_dict())})
    restored_records = RecordDict.inflate(records.deflate(), children={k: v for k, v in records.children.items()})
    restored = ClientPrivacyState.from_dict(restored_records[STATE_KEY])
    assert restored.history == [(1.3, 0.04, 50)]
    assert restored.rounds_participated == 2 and restored.budget_epsilon == 4.0
    assert restored.epsilon() == state.epsilon()


def test_malformed_privacy_state_is_refused():
    record = ClientPrivacyState(1.0, 0.1, 1e-5, "rdp", None, [(1.0, 0.1, 5)]).to_dict()
    record["history_rate"] = [1.5]
    from fedguard.privacy.client_budget import PrivacyStateError

    with pytest.raises(PrivacyStateError, match="impossible"):
        ClientPrivacyState.from_dict(record)


def _digits_setup(cfg, seed: int = 5):
    site = read_site_settings({"partition-id": 0, "num-partitions": cfg.simulation.num_clients})
    data = load_local_data(cfg, site)
    from fedguard.clients.models import build_model

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes, private=True)
    return model, make_training_setup(model, data.train_x, data.train_y, cfg.train, seed)


def test_dp_changes_the_update_and_accumulates_in_state():
    cfg = compose_config([*DP, "privacy.target_epsilon=null", "privacy.noise_multiplier=1.0"])
    plain_model, plain_setup = _digits_setup(compose_config())
    PlainTrainer(cfg.train).train(plain_setup, state=RecordDict(), device=torch.device("cpu"), regularizer=None)
    dp_model, dp_setup = _digits_setup(cfg)
    state = RecordDict()
    result = build_trainer(cfg, None).train(dp_setup, state=state, device=torch.device("cpu"), regularizer=None)
    assert not torch.allclose(_flat(plain_model), _flat(dp_model))
    first = result.privacy
    assert first["steps_round"] == first["steps_total"] > 0 and first["rounds_participated"] == 1
    _, dp_setup_2 = _digits_setup(cfg, seed=6)
    second = build_trainer(cfg, None).train(dp_setup_2, state=state, device=torch.device("cpu"), regularizer=None)
    assert second.privacy["steps_total"] == 2 * first["steps_total"]
    assert second.privacy["epsilon"] > first["epsilon"]


def test_per_sample_clipping_bounds_one_huge_example():
    features = np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32)
    features[3] *= 1e4  # one example with an enormous gradient
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1], dtype=np.int64)
    with torch.no_grad():  # label the huge example against the model's guess, so its gradient is huge too
        labels[3] = (int(_linear()(torch.from_numpy(features[3:4])).argmax()) + 1) % 3
    overrides = [
        *DP, "privacy.target_epsilon=null", "privacy.noise_multiplier=0", "privacy.allow_zero_noise=true",
        "privacy.poisson_sampling=false", "privacy.max_grad_norm=0.5", "train.batch_size=8",
        "train.momentum=0", "train.learning_rate=1.0",
    ]
    cfg = compose_config(overrides)
    for private in (False, True):
        model = _linear()
        before = _flat(model).clone()
        setup = make_training_setup(model, features, labels, cfg.train, seed=0)
        trainer = SampleDPTrainer(PlainTrainer(cfg.train), cfg, None) if private else PlainTrainer(cfg.train)
        trainer.train(setup, state=RecordDict(), device=torch.device("cpu"), regularizer=None)
        step = float((_flat(model) - before).norm())
        if private:
            # mean of 8 per-example gradients, each clipped to C: the step is at most lr * C
            assert step <= 1.0 * 0.5 + 1e-6
        else:
            assert step > 100.0  # without clipping the huge example dominates


def test_budget_refusal_keeps_state_and_reports():
    cfg = compose_config([*DP, "privacy.target_epsilon=null", "privacy.noise_multiplier=1.0", "train.max_steps=4"])
    _, setup = _digits_setup(cfg)
    q = 1.0 / len(setup.loader)
    one_round = compute_epsilon([(1.0, q, 4)], 1e-5, "rdp").epsilon
    two_rounds = compute_epsilon([(1.0, q, 8)], 1e-5, "rdp").epsilon
    state = RecordDict()
    trainer = build_trainer(cfg, site_budget=(one_round + two_rounds) / 2)  # a site's own, stricter budget
    trainer.train(setup, state=state, device=torch.device("cpu"), regularizer=None)
    saved = copy.deepcopy(dict(state[STATE_KEY]))
    _, setup_2 = _digits_setup(cfg, seed=9)
    with pytest.raises(BudgetExhausted) as refused:
        trainer.train(setup_2, state=state, device=torch.device("cpu"), regularizer=None)
    assert refused.value.report["refused"] and "budget exhausted" in refused.value.report["reason"]
    assert refused.value.report["epsilon"] == pytest.approx(one_round)
    assert dict(state[STATE_KEY]) == saved  # a refusal spends nothing


def test_zero_noise_is_refused_unless_allowed():
    with pytest.raises(ConfigError, match="allow_zero_noise"):
        compose_config([*DP, "privacy.target_epsilon=null", "privacy.noise_multiplier=0"])
    with pytest.raises(ConfigError, match="exactly one"):
        compose_config([*DP, "privacy.noise_multiplier=1.0"])


@pytest.mark.simulation
def test_simulation_budget_for_two_rounds_stops_cleanly_with_exact_accounting(tmp_path):
    overrides = [*DP, "privacy.target_epsilon=null", "privacy.noise_multiplier=1.0", "train.max_steps=4",
                 "simulation.rounds=4"]
    cfg = compose_config(overrides)
    _, setup = _digits_setup(cfg)
    q = 1.0 / len(setup.loader)  # every tiny digits client has the same number of batches
    budget = (compute_epsilon([(1.0, q, 8)], 1e-5, "rdp").epsilon + compute_epsilon([(1.0, q, 12)], 1e-5, "rdp").epsilon) / 2
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "fedguard.simulations.cli", "simulate", *overrides, f"privacy.max_epsilon={budget}",
         f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients_replied"] for r in rounds] == [5, 5, 0]
    assert rounds[2]["clients_refused"] == 5
    assert all(p["refused"] for p in rounds[2]["privacy"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "too few clients left" in summary["stop_reason"]
    # every reported epsilon equals Opacus's RDP accountant on the recorded history, and grows
    by_client: dict[int, list[float]] = {}
    for record in rounds[:2]:
        for report in record["privacy"]:
            accountant = RDPAccountant()
            accountant.history = [(report["noise_multiplier"], report["sample_rate"], report["steps_total"])]
            assert report["epsilon"] == pytest.approx(accountant.get_epsilon(report["delta"]), rel=1e-9)
            by_client.setdefault(report["partition-id"], []).append(report["epsilon"])
    assert len(by_client) == 5
    assert all(eps[0] < eps[1] <= budget for eps in by_client.values())
    table = summary["privacy"]["clients"]
    assert summary["privacy"]["max_epsilon"] == pytest.approx(max(e[-1] for e in by_client.values()))
    assert all(row["rounds_participated"] == 2 and row["steps_total"] == 8 for row in table.values())


def test_every_grad_sample_mode_gives_the_same_clipped_update():
    overrides = [
        *DP, "model=cnn", "privacy.target_epsilon=null", "privacy.noise_multiplier=0", "privacy.allow_zero_noise=true",
        "privacy.poisson_sampling=false", "privacy.max_grad_norm=0.1", "train.max_steps=2", "train.momentum=0",
    ]
    updates = {}
    for mode in ("hooks", "functorch", "ghost"):
        cfg = compose_config([*overrides, f"privacy.grad_sample_mode={mode}"])
        model, setup = _digits_setup(cfg, seed=3)
        before = _flat(model).clone()
        build_trainer(cfg, None).train(setup, state=RecordDict(), device=torch.device("cpu"), regularizer=None)
        updates[mode] = _flat(model) - before
    assert updates["hooks"].norm() > 0
    for mode in ("functorch", "ghost"):
        assert torch.allclose(updates[mode], updates["hooks"], atol=1e-5, rtol=1e-4), mode
