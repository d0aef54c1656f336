"""Issue #14: every epsilon sample-level DP prints must hold for what a client really does.

Attacks where possible: rebuild a DP client's batches and noise from the recorded config;
count the noise the mechanism releases on empty Poisson batches; check FedProx's term
survives DP-SGD; check what a DP client sends besides its noised update.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import RecordDict
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer_fast_gradient_clipping import DPOptimizerFastGradientClipping
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from scipy.stats import chi2

from fedguard.clients import app as client_app_module
from fedguard.clients import private_training
from fedguard.clients.app import _round_seed, load_local_data
from fedguard.clients.models import build_model
from fedguard.clients.private_training import PlainTrainer, SampleDPTrainer, build_trainer
from fedguard.clients.site import read_site_settings
from fedguard.clients.training import make_training_setup, proximal_regularizer
from fedguard.conf import ConfigError, compose_config

DP = ["privacy=sample_dp", "privacy.target_epsilon=null", "privacy.noise_multiplier=1.0"]
CPU = torch.device("cpu")


@pytest.fixture
def drawn_masks(monkeypatch):
    """Every Poisson batch (the index list) Opacus's sampler draws in this test, in order."""
    masks: list[list[int]] = []
    original = UniformWithReplacementSampler.__iter__

    def spy(self):
        for batch in original(self):
            masks.append(list(batch))
            yield batch

    monkeypatch.setattr(UniformWithReplacementSampler, "__iter__", spy)
    return masks


def _site_data(cfg, partition: int = 0):
    site = read_site_settings({"partition-id": partition, "num-partitions": cfg.simulation.num_clients})
    return site, load_local_data(cfg, site)


def _model(cfg, data, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(cfg.model, data.input_shape, data.num_classes, private=True)


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# --- 1. batches and noise come from OS randomness, never from the recorded config ----------


def _train_as_the_old_app_seeded_it(cfg, site, data, server_round: int) -> torch.nn.Module:
    """A DP client's round, given the loader the old ClientApp built (seeded from the config)."""
    torch.manual_seed(cfg.seed)  # and the global RNG too, as the empirical audit and bench did
    model = _model(cfg, data)
    setup = make_training_setup(model, data.train_x, data.train_y, cfg.train, _round_seed(cfg, site, server_round))
    build_trainer(cfg, None).train(setup, state=RecordDict(), device=CPU, regularizer=None)
    return model


def test_attack_rebuilding_a_dp_clients_batches_from_config_fails(drawn_masks):
    cfg = compose_config([*DP, "train.max_steps=6"])
    site, data = _site_data(cfg)
    _train_as_the_old_app_seeded_it(cfg, site, data, server_round=3)
    drawn = drawn_masks[:6]  # the loop may draw one more before max_steps stops it
    # The attacker holds config.yaml: seed, partition id, round. It rebuilds the loader the old
    # code built and lets Opacus derive its Poisson sampler from it, as make_private did.
    rebuilt_setup = make_training_setup(
        _model(cfg, data), data.train_x, data.train_y, cfg.train, _round_seed(cfg, site, 3)
    )
    drawn_masks.clear()
    rebuilt_loader = DPDataLoader.from_data_loader(rebuilt_setup.loader)
    for _batch, _ in zip(rebuilt_loader, range(6)):  # iterate as training does (the iterator draws a seed first)
        pass
    rebuilt = drawn_masks[:6]
    assert rebuilt != drawn
    # Not one batch matches (each is a subset of ~1/len(loader) of the examples drawn at random).
    assert sum(a == b for a, b in zip(rebuilt, drawn)) <= 1


def test_two_runs_with_identical_config_draw_different_masks_and_noise(drawn_masks):
    cfg = compose_config([*DP, "train.max_steps=4"])
    site, data = _site_data(cfg)
    first = _train_as_the_old_app_seeded_it(cfg, site, data, server_round=1)
    first_masks = list(drawn_masks)
    drawn_masks.clear()
    second = _train_as_the_old_app_seeded_it(cfg, site, data, server_round=1)
    assert drawn_masks[:4] != first_masks[:4]
    # Same seed everywhere, same data: identical models would mean predictable noise.
    assert not torch.allclose(_flat(first), _flat(second))


@pytest.mark.usefixtures("flower_task_identity")
def test_the_client_app_never_seeds_a_dp_loader_from_the_config(monkeypatch):
    seeds = []
    real = client_app_module.make_training_setup

    def capture(model, features, labels, train_cfg, seed):
        seeds.append(seed)
        return real(model, features, labels, train_cfg, seed)

    monkeypatch.setattr(client_app_module, "make_training_setup", capture)
    from client_app_support import train_message, run_train  # noqa: PLC0415 - test helper module

    for overrides in ([*DP, "train.max_steps=1"], ["train.max_steps=1"]):
        cfg = compose_config(["model=logreg", "device=cpu", *overrides])
        run_train(train_message(cfg, server_round=2), state_dir=None)
    assert seeds[0] is None  # sample-level DP: OS randomness
    assert isinstance(seeds[1], int)  # non-private training stays reproducible


# --- 2. shuffled batches are not ledgered as Poisson ------------------------------------------


def test_non_poisson_batches_are_refused_under_dp():
    with pytest.raises(ConfigError, match="privacy.poisson_sampling"):
        compose_config([*DP, "privacy.poisson_sampling=false"])
    with pytest.raises(ConfigError, match="privacy.poisson_sampling"):
        compose_config(["privacy=sample_dp", "privacy.poisson_sampling=false"])  # calibrated noise too
    # The zero-noise debugging mode claims no privacy (epsilon infinite) and may shuffle.
    compose_config([*DP[:2], "privacy.noise_multiplier=0", "privacy.allow_zero_noise=true", "privacy.poisson_sampling=false"])


# --- 3. empty Poisson batches get their noise; steps accounted == steps checked -------------


def _tiny_setup(cfg, n: int = 20, width: int = 8):
    """n examples, batch size 1: q = 1/n, so about a third of the Poisson draws are empty."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(n, width)).astype(np.float32)
    labels = rng.integers(0, 3, size=n).astype(np.int64)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(width, 3))
    return make_training_setup(model, features, labels, cfg.train, seed=None)


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bookkeeping"])
@pytest.mark.parametrize("max_steps", [None, 30])
def test_every_poisson_draw_releases_noise_and_is_accounted_once(mode, max_steps, drawn_masks, monkeypatch):
    noise_calls = []
    for cls in (DPOptimizer, DPOptimizerFastGradientClipping):
        original = cls.add_noise
        monkeypatch.setattr(cls, "add_noise", lambda self, _o=original: (noise_calls.append(1), _o(self))[1])
    lean = private_training.use_lean_steps

    def counted_lean_steps(optimizer) -> None:
        # ghost and book-keeping optimizers get their own add_noise (dp_steps.use_lean_steps): count that one
        lean(optimizer)
        installed = optimizer.__dict__.get("add_noise")
        if installed is not None:
            optimizer.add_noise = lambda: (noise_calls.append(1), installed())[1]

    monkeypatch.setattr(private_training, "use_lean_steps", counted_lean_steps)
    cfg = compose_config(
        [*DP, "train.batch_size=1", "train.local_epochs=3", f"train.max_steps={max_steps or 'null'}",
         f"privacy.grad_sample_mode={mode}"]
    )
    setup = _tiny_setup(cfg)
    planned = 60 if max_steps is None else max_steps
    state = RecordDict()
    result = SampleDPTrainer(PlainTrainer(cfg.train), cfg, None).train(setup, state=state, device=CPU, regularizer=None)
    draws = drawn_masks[:planned]  # the sampler may have drawn one more before the cap stopped the loop
    assert sum(len(m) == 0 for m in draws) >= 3  # empty batches really happened (P(fewer) < 1e-5)
    assert len(noise_calls) == planned  # one noise release per draw, empty or not
    assert result.outcome.steps == planned
    assert result.privacy["steps_round"] == result.privacy["steps_total"] == planned  # what was checked


def test_physical_batch_splitting_caps_logical_steps():
    """With Opacus's BatchMemoryManager, max_steps counts DP-SGD steps, not physical batches."""
    cfg = compose_config([*DP, "privacy.max_physical_batch_size=8", "train.batch_size=32", "train.max_steps=3"])
    _, data = _site_data(cfg)
    setup = make_training_setup(_model(cfg, data), data.train_x, data.train_y, cfg.train, seed=None)
    result = build_trainer(cfg, None).train(setup, state=RecordDict(), device=CPU, regularizer=None)
    assert result.outcome.steps == result.privacy["steps_round"] == 3


def test_an_empty_batch_step_is_pure_noise_of_the_right_scale(monkeypatch):
    """Noise-only steps move the model by lr * N(0, sigma^2 C^2) / expected batch size, per coordinate."""
    cfg = compose_config(
        [*DP[:2], "privacy.noise_multiplier=2.0", "privacy.max_grad_norm=0.5", "train.batch_size=1",
         "train.momentum=0", "train.learning_rate=1.0", "train.max_steps=400"]
    )
    setup = _tiny_setup(cfg, n=400, width=256)  # expected batch size int(400 * 1/400) = 1; 771 parameters
    # Make every batch empty: a sampler that always draws nobody.
    monkeypatch.setattr(UniformWithReplacementSampler, "__iter__", lambda self: iter([[] for _ in range(self.steps)]))
    before = _flat(setup.model).clone()
    SampleDPTrainer(PlainTrainer(cfg.train), cfg, None).train(setup, state=RecordDict(), device=CPU, regularizer=None)
    moved = (_flat(setup.model) - before).numpy()
    # 400 independent N(0, (2 * 0.5)^2) steps per coordinate: each coordinate ~ N(0, 20^2), so
    # sum((moved / 20)^2) ~ chi2(771). Bounds at a 1e-9 false-failure rate (the noise is OS
    # randomness, so the test cannot be seeded): about 0.84x..1.17x the std; 2x off is far outside.
    statistic = float(np.sum((moved.astype(np.float64) / 20.0) ** 2))
    assert chi2.ppf(0.5e-9, moved.size) < statistic < chi2.isf(0.5e-9, moved.size)


# --- 4. FedProx's proximal term survives DP-SGD --------------------------------------------


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_fedprox_term_is_applied_after_the_noise(mode):
    overrides = [
        "privacy=sample_dp", "privacy.target_epsilon=null", "privacy.noise_multiplier=0", "privacy.allow_zero_noise=true",
        "privacy.poisson_sampling=false", "train.max_steps=1", "train.momentum=0", "train.learning_rate=0.5",
        f"privacy.grad_sample_mode={mode}", "strategy=fedprox",
    ]
    cfg = compose_config(overrides)
    _, data = _site_data(cfg)
    mu, offset = 0.3, 0.2
    global_model = _model(cfg, data)
    with torch.no_grad():
        for p in global_model.parameters():
            p.add_(offset)  # the local model starts offset below the anchors
    moves = {}
    for with_prox in (False, True):
        model = _model(cfg, data)
        before = _flat(model).clone()
        setup = make_training_setup(model, data.train_x, data.train_y, cfg.train, seed=7)
        regularizer = proximal_regularizer(global_model, mu) if with_prox else None
        build_trainer(cfg, None).train(setup, state=RecordDict(), device=CPU, regularizer=regularizer)
        moves[with_prox] = _flat(model) - before
    # One SGD step: the proximal gradient mu * (w - w_global) = -mu * offset adds lr * mu * offset.
    difference = moves[True] - moves[False]
    assert torch.allclose(difference, torch.full_like(difference, 0.5 * mu * offset), atol=1e-5)


# --- 5. a cached update never enters a second secure-aggregation sum -------------------------


@pytest.mark.usefixtures("flower_task_identity")
def test_a_resumed_server_cannot_get_a_sites_update_into_two_secagg_sums(tmp_path):
    from client_app_support import run_train, train_message  # noqa: PLC0415

    from fedguard.clients.wire import protocol
    from fedguard.clients.secure_aggregation import INPUT_STATE_KEY

    cfg = compose_config(["model=logreg", "device=cpu", *DP, "train.max_steps=2", "secure_agg=secaggplus"])
    message = train_message(cfg, server_round=4)
    first = run_train(message, tmp_path)
    assert not first.has_error() and protocol.SECAGG_KEY in first.content  # session 1: update held, keys advertised
    ledger_before = first.content[protocol.LEDGER_KEY][protocol.LEDGER_ENTRIES_FIELD]
    # The server restarts and asks again: same round, same global model, a new SecAgg+ session
    # over a cohort of its choosing. A resend here would be sum 2 minus (sum 1 minus the site).
    from flwr.app import Context

    context = Context(run_id=2, node_id=7, node_config={"partition-id": 0, "num-partitions": 5, "state-dir": str(tmp_path)},
                      state=RecordDict(), run_config={})
    second = client_app_module.app(train_message(cfg, server_round=4, arrays=message.content[protocol.ARRAYS_KEY]), context)
    # Refused by the site's on-disk SecAgg+ session record (clients/secagg_record.py), which now
    # lives in the state dir and so outlasts the server's restart; before it, the DP resend cache did.
    assert second.has_error() and "round 4 already entered a secure-aggregation session" in second.error.reason
    assert INPUT_STATE_KEY not in context.state  # nothing held for the new session to mask
    # and the site did not retrain (no second spend on its ledger)
    third = run_train(train_message(cfg, server_round=5, arrays=message.content[protocol.ARRAYS_KEY]), tmp_path)
    entries = third.content[protocol.LEDGER_KEY][protocol.LEDGER_ENTRIES_FIELD]
    assert len(entries) == len(ledger_before) + 1  # round 5's spend only


@pytest.mark.usefixtures("flower_task_identity")
def test_without_secure_aggregation_the_same_reply_is_resent(tmp_path):
    from client_app_support import run_train, train_message  # noqa: PLC0415

    from fedguard.clients.wire import protocol

    cfg = compose_config(["model=logreg", "device=cpu", *DP, "train.max_steps=2"])
    message = train_message(cfg, server_round=4)
    first, second = run_train(message, tmp_path), run_train(message, tmp_path)
    assert not second.has_error()
    for key in first.content[protocol.ARRAYS_KEY].keys():
        a, b = (r.content[protocol.ARRAYS_KEY][key].numpy() for r in (first, second))
        assert np.array_equal(a, b)  # the server saw exactly this before: re-releasing it costs nothing


# --- 6. the claim names its relation; what else leaves a DP client is sent only on opt-in ----


@pytest.mark.usefixtures("flower_task_identity")
def test_a_dp_client_sends_no_raw_loss_and_names_its_relation_in_the_ledger(tmp_path):
    import json  # noqa: PLC0415
    import math  # noqa: PLC0415

    from client_app_support import run_train, train_message  # noqa: PLC0415

    from fedguard.clients.wire import protocol

    losses = {}
    for name, overrides in {"dp": DP, "opt-in": [*DP, "privacy.release_unaccounted_metrics=true"], "plain": []}.items():
        cfg = compose_config(["model=logreg", "device=cpu", "train.max_steps=2", *overrides])
        reply = run_train(train_message(cfg, server_round=1), tmp_path / name)
        losses[name] = float(reply.content[protocol.METRICS_KEY][protocol.TRAIN_LOSS_KEY])
        if name == "dp":
            entries = reply.content[protocol.LEDGER_KEY][protocol.LEDGER_ENTRIES_FIELD]
            assert json.loads(entries[-1])["body"]["neighbouring"] == "add-or-remove-one-record"
    assert math.isnan(losses["dp"])
    assert math.isfinite(losses["opt-in"]) and math.isfinite(losses["plain"])


def test_local_evaluation_under_dp_needs_an_explicit_opt_in():
    with pytest.raises(ConfigError, match="evaluate.fraction_clients"):
        compose_config([*DP, "evaluate.fraction_clients=0.5"])
    compose_config([*DP, "evaluate.fraction_clients=0.5", "privacy.release_unaccounted_metrics=true"])
    compose_config(["evaluate.fraction_clients=0.5"])  # no DP claim, nothing to protect it from


def test_summary_states_the_neighbouring_relation_and_the_unaccounted_releases(tmp_path):
    from fedguard.conf.run_config import config_to_yaml
    from fedguard.server.run_record import RunRecorder

    report = {"epsilon": 1.0, "delta": 1e-5, "noise_multiplier": 1.0, "sample_rate": 0.1, "steps_total": 5,
              "rounds_participated": 1, "accountant": "rdp", "refused": False}
    for opt_in in (False, True):
        cfg = compose_config([*DP, f"privacy.release_unaccounted_metrics={str(opt_in).lower()}"])
        recorder = RunRecorder(tmp_path / str(opt_in), config_to_yaml(cfg), 1, show_progress=False)
        recorder.client_privacy = {0: report}
        summary = recorder._privacy_summary()
        assert summary["neighbouring_relation"] == "add-or-remove-one-record"
        assert "num-examples" in summary["treated_as_public"]
        assert bool(summary["unaccounted_releases"]) == opt_in


def test_a_step_cap_draws_no_batch_for_the_epochs_after_it():
    """``max_steps`` ends training, not only the epoch: the loop used to start every remaining
    epoch and draw (and discard) one batch from each, 99 draws for a 1-step cap over 100 epochs."""
    from torch import nn

    from fedguard.clients.training import TrainingSetup, run_epochs

    class CountingLoader:
        def __init__(self) -> None:
            self.draws = 0

        def __iter__(self):
            for _ in range(5):
                self.draws += 1
                yield torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)

    model = nn.Linear(3, 2)
    loader = CountingLoader()
    setup = TrainingSetup(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, nn.CrossEntropyLoss())
    outcome = run_epochs(setup, epochs=100, device=torch.device("cpu"), max_steps=7)
    assert outcome.steps == 7
    assert loader.draws == 8  # 5 in the first epoch, 3 in the second (the last one fetched, then the cap)
