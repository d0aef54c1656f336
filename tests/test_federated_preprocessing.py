"""Federated preprocessing: exact pooled statistics without DP, calibrated noise and accounting
under DP, refusals of a second request and of an unpayable one, the audit recomputing it all."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf
from scipy import stats as scipy_stats

from fedguard.clients.data_spend import DataSpend
from fedguard.clients.preprocessing import (
    RELEASE_SUFFIX,
    PreprocessingRefused,
    contract_layout,
    release_sums,
    site_sums,
)
from fedguard.clients.site_state import LINEAGE_PATTERN
from fedguard.clients.site import read_site_settings
from fedguard.clients.own_files import own_split
from fedguard.conf import compose_config
from fedguard.conf.contract import declared_contract_of
from fedguard.conf.preprocessing_checks import check_preprocessing
from fedguard.conf.schema import ConfigError
from fedguard.privacy.accounting import calibrate_noise_multiplier, compute_epsilon
from fedguard.privacy.preprocessing import (
    FeatureRange,
    SumsLayout,
    add_noise,
    bounded_sums,
    l2_sensitivity,
    noise_std,
    statistics_from_sums,
)
from fedguard.server.preprocessing import PreprocessingFailed, run_preprocessing
from tests.preprocessing_support import LoopbackGrid, wine_sites

LINEAGE = "lineage-pre"
pytestmark = pytest.mark.usefixtures("flower_task_identity")


@pytest.fixture(scope="module")
def base_cfg():
    return compose_config(["dataset=tabular", "model=mlp", "dataset.preprocessing=federated", "simulation.num_clients=3"])


def _cfg(base, **privacy):
    cfg = base.copy()
    if privacy:
        dp = compose_config(["dataset=tabular", "privacy=sample_dp", "dataset.preprocessing=federated",
                             "simulation.num_clients=3"]).privacy
        cfg.privacy = dp
        for key, value in privacy.items():
            cfg.privacy[key] = value
    return cfg


def _yaml(cfg) -> str:
    from fedguard.conf.run_config import config_to_yaml

    return config_to_yaml(cfg)


def _pooled_training_rows(cfg, sites) -> pd.DataFrame:
    """The rows every site trains on, pooled (what a central analyst would standardise with)."""
    frames = []
    for config in sites.values():
        split = own_split(cfg, read_site_settings(config))
        frame = pd.read_csv(next((__import__("pathlib").Path(config["data"])).glob("*.csv")))
        frames.append(frame.iloc[split.train])
    return pd.concat(frames)


@pytest.mark.simulation  # the real ClientApp reads three sites' files: over a second
def test_without_dp_the_statistics_are_the_pooled_statistics(base_cfg, tmp_path):
    cfg = _cfg(base_cfg)
    sites = wine_sites(tmp_path, state=False)
    outcome = run_preprocessing(LoopbackGrid(sites), cfg, _yaml(cfg), LINEAGE, timeout=60)
    pooled = _pooled_training_rows(cfg, sites)
    contract = declared_contract_of(cfg.dataset)
    assert outcome.sites == 3 and outcome.statistics["count"] == len(pooled)
    for feature in (f for f in contract.features if f.kind == "numeric"):
        column = pooled[feature.name].clip(feature.low, feature.high)
        got = outcome.statistics["features"][feature.name]
        assert got["mean"] == pytest.approx(column.mean(), rel=1e-12, abs=1e-12)
        assert got["std"] == pytest.approx(column.std(ddof=0), rel=1e-9)
    frequencies = pooled["colour"].value_counts(normalize=True)
    for category, share in outcome.statistics["frequencies"]["colour"].items():
        assert share == pytest.approx(frequencies.get(category, 0.0), abs=1e-12)


def test_clipping_to_the_declared_range_bounds_a_record_and_images_pool_exactly():
    layout = SumsLayout(2, (3,))
    assert l2_sensitivity(layout) == pytest.approx(math.sqrt(1 + 4 + 1))
    ranges = (FeatureRange(0, 10), FeatureRange(-1, 1))
    wild = np.array([[1e9, -1e9]])
    one = bounded_sums(np.clip((wild - 5) / 5, -1, 1)[:, :1].repeat(2, 1), np.ones((1, 2)), [np.array([2])], layout)
    assert np.linalg.norm(one) <= l2_sensitivity(layout) + 1e-12
    # Images: mean and variance over all pixels of all sites, from per-image moments.
    from fedguard.clients.local_data import ImageRecords
    from fedguard.conf.contract import ImageContract

    contract = ImageContract(1, 4, 4, ("a", "b"))
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 256, size=(n, 1, 4, 4), dtype=np.uint8) for n in (5, 9, 2)]
    lay, rngs = contract_layout(contract)
    total = sum(site_sums(ImageRecords(p, np.zeros(len(p), dtype=np.int64)), contract)[0] for p in parts)
    got = statistics_from_sums(total, lay, rngs)
    pixels = np.concatenate(parts).astype(np.float64) / 255
    assert got.means[0] == pytest.approx(pixels.mean(), rel=1e-12)
    assert got.stds[0] == pytest.approx(pixels.std(), rel=1e-9)
    assert statistics_from_sums(np.zeros(lay.length), lay, ranges[:1]).count == 0.0


def test_dp_release_carries_noise_of_the_calibrated_scale():
    """Chi-square test of the noise's variance over many coordinates: false failure < 1e-9."""
    layout = SumsLayout(20, (5, 5))
    std = noise_std(3.0, layout)
    draws = 400
    noise = np.concatenate([add_noise(np.zeros(layout.length), std) for _ in range(draws)])
    dof = noise.size
    statistic = float(np.sum((noise / std) ** 2))
    low, high = scipy_stats.chi2.ppf(5e-10, dof), scipy_stats.chi2.ppf(1 - 5e-10, dof)
    assert low < statistic < high, (statistic, low, high)
    # A release with half the noise (a broken calibration) fails the same test.
    assert float(np.sum((noise / 2 / std) ** 2)) < low


def _ledger_entries(state_dir):
    lines = (state_dir / "ledger" / f"{LINEAGE}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.simulation  # the real ClientApp reads three sites' files: over a second
def test_dp_release_is_noised_paid_from_the_site_budget_and_on_its_ledger(base_cfg, tmp_path):
    cfg = _cfg(base_cfg, target_epsilon=3.0)
    sites = wine_sites(tmp_path)
    grid = LoopbackGrid(sites)
    outcome = run_preprocessing(grid, cfg, _yaml(cfg), LINEAGE, timeout=60)
    assert outcome.sites == 3
    sigma = calibrate_noise_multiplier(target_epsilon=0.5, delta=1e-5, sample_rate=1.0, steps=1, accountant="rdp")
    expected_epsilon = compute_epsilon([(sigma, 1.0, 1)], 1e-5, "rdp").epsilon
    assert expected_epsilon <= 0.5
    for i, config in enumerate(sites.values()):
        state = tmp_path / f"state-{i}"
        entries = [e for e in _ledger_entries(state) if e["kind"] == "preprocessing_release"]
        assert len(entries) == 1
        body = entries[0]["body"]
        assert body["noise_multiplier"] == pytest.approx(sigma)
        assert body["noise_std"] == pytest.approx(sigma * math.sqrt(1 + 2 * 12 + 1))
        assert body["epsilon"] == pytest.approx(expected_epsilon)
        # The per-data spend holds the release, so every later training run on these rows counts it.
        record = json.loads(next((state / "privacy" / "data").glob("*.json")).read_text())
        assert record["lineages"][f"{LINEAGE}:preprocessing"] == {"sigma": [sigma], "rate": [1.0], "steps": [1]}
    # The sums that left the sites are not the exact ones.
    exact = run_preprocessing(LoopbackGrid(wine_sites(tmp_path / "plain", state=False)), _cfg(base_cfg),
                              _yaml(_cfg(base_cfg)), LINEAGE, timeout=60)
    assert outcome.statistics["count"] != exact.statistics["count"]


@pytest.mark.simulation  # the real ClientApp reads three sites' files: over a second
def test_secure_noise_covers_the_release_too(base_cfg, tmp_path, monkeypatch):
    """privacy.secure_noise=true asks for CSPRNG noise (floating-point attacks on torch's sampler):
    the statistics release draws from it as DP-SGD does."""
    from fedguard.privacy.secure_noise import SecureGaussian

    drawn = []
    real = SecureGaussian.gaussian
    monkeypatch.setattr(SecureGaussian, "gaussian", lambda self, std, ref: (drawn.append((std, ref.numel())), real(self, std, ref))[1])
    cfg = _cfg(base_cfg, target_epsilon=3.0, secure_noise=True)
    outcome = run_preprocessing(LoopbackGrid(wine_sites(tmp_path)), cfg, _yaml(cfg), LINEAGE, timeout=60)
    assert outcome.sites == 3 and len(drawn) == 3  # one noise vector per site, all from the CSPRNG
    assert all(count == 1 + 2 * 12 + 3 for _, count in drawn)  # count, 12 sums, 12 squares, 3 category counts


@pytest.mark.simulation  # the real ClientApp reads three sites' files: over a second
def test_a_second_request_is_refused_and_a_new_run_is_charged_again(base_cfg, tmp_path):
    """Attack: the server asks twice (to average the noise away) or asks one site alone."""
    cfg = _cfg(base_cfg, target_epsilon=3.0)
    sites = wine_sites(tmp_path)
    grid = LoopbackGrid(sites)
    run_preprocessing(grid, cfg, _yaml(cfg), LINEAGE, timeout=60)
    with pytest.raises(PreprocessingFailed, match="already released its preprocessing statistics"):
        run_preprocessing(grid, cfg, _yaml(cfg), LINEAGE, timeout=60)
    # A cohort of one, in a new run on the same data: answered, but charged on top of the first.
    alone = LoopbackGrid({100: sites[100]})
    outcome = run_preprocessing(alone, cfg, _yaml(cfg), "lineage-other", timeout=60)
    assert outcome.sites == 1
    state = tmp_path / "state-0"
    record = json.loads(next((state / "privacy" / "data").glob("*.json")).read_text())
    sigma = record["lineages"][f"{LINEAGE}:preprocessing"]["sigma"][0]
    assert set(record["lineages"]) == {f"{LINEAGE}:preprocessing", "lineage-other:preprocessing"}
    second = [json.loads(line) for line in (state / "ledger" / "lineage-other.jsonl").read_text().splitlines()]
    twice = compute_epsilon([(sigma, 1.0, 1)] * 2, 1e-5, "rdp").epsilon
    assert second[-1]["body"]["epsilon"] == pytest.approx(twice)


@pytest.mark.simulation  # the real ClientApp reads three sites' files: over a second
def test_a_run_named_like_the_release_cannot_erase_its_charge(base_cfg, tmp_path):
    """Attack: release in lineage L, then start a DP run whose lineage id is the release's name and let
    it refuse on budget: its fresh (empty) history is saved under that name. It must not replace the
    release's charge, or every run id would buy a free release."""
    cfg = _cfg(base_cfg, target_epsilon=3.0)
    sites = wine_sites(tmp_path)
    run_preprocessing(LoopbackGrid(sites), cfg, _yaml(cfg), LINEAGE, timeout=60)
    sigma = calibrate_noise_multiplier(target_epsilon=0.5, delta=1e-5, sample_rate=1.0, steps=1, accountant="rdp")
    privacy_dir = tmp_path / "state-0" / "privacy"
    data = DataSpend(privacy_dir, next((privacy_dir / "data").glob("*.json")).stem)
    for lineage in (f"{LINEAGE}-preprocessing", f"{LINEAGE}_preprocessing", f"{LINEAGE}preprocessing"):
        assert LINEAGE_PATTERN.match(lineage)  # ids a server may choose
        data.save(lineage, [], None)  # what a refused first round in that lineage records
        prior, _ = data.prior(lineage)
        assert [s for s, _, _ in prior] == [pytest.approx(sigma)]  # the release still counts
    assert LINEAGE_PATTERN.match(f"{LINEAGE}{RELEASE_SUFFIX}") is None  # and no run can be called that


@pytest.mark.simulation  # the real ClientApp reads three sites' files: over a second
def test_the_sites_privacy_floor_applies_to_preprocessing(base_cfg, tmp_path):
    """Attack: a site pins max-epsilon 1; the server asks for statistics at a weaker setting, or without DP."""
    sites = wine_sites(tmp_path)
    for config in sites.values():
        config["max-epsilon"] = 1.0
    weak = _cfg(base_cfg, target_epsilon=3.0)
    with pytest.raises(PreprocessingFailed, match="privacy.target_epsilon=3.0 is above"):
        run_preprocessing(LoopbackGrid(sites), weak, _yaml(weak), LINEAGE, timeout=60)
    plain = _cfg(base_cfg)
    with pytest.raises(PreprocessingFailed, match="privacy.mode=none is without differential privacy"):
        run_preprocessing(LoopbackGrid(sites), plain, _yaml(plain), LINEAGE, timeout=60)
    assert not list((tmp_path / "state-0").rglob("*.jsonl"))  # nothing released, nothing on a ledger


@pytest.mark.simulation  # the real ClientApp reads three sites' files: over a second
def test_a_site_whose_budget_cannot_pay_refuses_with_the_figures(base_cfg, tmp_path):
    cfg = _cfg(base_cfg, target_epsilon=3.0)
    sites = wine_sites(tmp_path, budget=0.2)
    with pytest.raises(PreprocessingFailed) as failed:
        run_preprocessing(LoopbackGrid(sites), cfg, _yaml(cfg), LINEAGE, timeout=60)
    assert "over its budget 0.200" in str(failed.value) and "PreprocessingRefused" in str(failed.value)
    assert not (tmp_path / "state-0" / "ledger" / f"{LINEAGE}.jsonl").exists()
    site = read_site_settings(sites[100])
    with pytest.raises(PreprocessingRefused, match="over its budget"):
        split = own_split(cfg, site)
        sums, layout = site_sums(split.train_records, declared_contract_of(cfg.dataset))
        release_sums(cfg, site, LINEAGE, sums, layout, split.fingerprint)


def test_config_refuses_what_cannot_be_accounted(base_cfg):
    cfg = base_cfg.copy()
    cfg.dataset.contract.features[0].low = None
    cfg.dataset.contract.features[0].high = None
    with pytest.raises(ConfigError, match=r"features\[0\].*needs low and high"):
        check_preprocessing(cfg)
    cfg = base_cfg.copy()
    cfg.dataset.preprocessing = "pooled"
    with pytest.raises(ConfigError, match="allowed: declared, federated"):
        check_preprocessing(cfg)
    cfg = base_cfg.copy()
    cfg.secure_agg.mode = "secaggplus"
    check_preprocessing(cfg)  # exact sums are fine under SecAgg+: they travel masked (test_preprocessing_secagg.py)


def _audited_run(cfg, tmp_path, monkeypatch):
    from fedguard.privacy.audit.runner import run_audit
    from fedguard.server.privacy_ledger import FEDGUARD_HOME_ENV, FederationLedger

    monkeypatch.setenv(FEDGUARD_HOME_ENV, str(tmp_path / "home"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ledger = FederationLedger(run_dir, LINEAGE, _yaml(cfg), resumed_after=None)
    try:
        run_preprocessing(LoopbackGrid(wine_sites(tmp_path)), cfg, _yaml(cfg), LINEAGE, timeout=60,
                          record_ledgers=ledger.record_replies)
        ledger.finish(0, "preprocessing only")
    finally:
        ledger.close()
    return run_audit(run_dir, run_dir / "keys", with_pld=False)


@pytest.mark.simulation  # the real ClientApp reads three sites' files: over a second
def test_the_audit_recomputes_the_preprocessing_epsilon(base_cfg, tmp_path, monkeypatch):
    from fedguard.privacy.audit.runner import ExitCode

    cfg = _cfg(base_cfg, target_epsilon=3.0)
    result = _audited_run(cfg, tmp_path, monkeypatch)
    assert result.exit_code == ExitCode.OK, result.as_dict()
    sigma = calibrate_noise_multiplier(target_epsilon=0.5, delta=1e-5, sample_rate=1.0, steps=1, accountant="rdp")
    for name in ("0", "1", "2"):
        audit = result.spend.clients[name]
        assert audit.epsilon_same_method == pytest.approx(compute_epsilon([(sigma, 1.0, 1)], 1e-5, "rdp").epsilon)


@pytest.mark.simulation  # the real ClientApp reads three sites' files: over a second
def test_the_audit_catches_a_site_that_under_reports_its_preprocessing_spend(base_cfg, tmp_path, monkeypatch):
    import fedguard.clients.preprocessing as site_side
    from fedguard.privacy.accounting import EpsilonReport
    from fedguard.privacy.audit.runner import ExitCode

    real = site_side.compute_epsilon
    monkeypatch.setattr(site_side, "compute_epsilon",
                        lambda h, d, a: EpsilonReport(real(h, d, a).epsilon / 2, real(h, d, a).accountant))
    result = _audited_run(_cfg(base_cfg, target_epsilon=3.0), tmp_path, monkeypatch)
    assert result.exit_code == ExitCode.MISMATCH
    assert any("preprocessing: reported" in m for m in result.spend.clients["0"].mismatches)


@pytest.mark.simulation  # writes and reads the example sites' files: over a second under load
def test_the_per_data_account_does_not_depend_on_what_a_run_chooses(base_cfg, tmp_path):
    """Attack: the server changes the seed, the validation split or the declared scaling, so that the
    same records would be charged to a fresh, unspent per-data account in every run."""
    sites = wine_sites(tmp_path, state=False)
    site = read_site_settings(sites[100])
    first = own_split(base_cfg, site).fingerprint
    for key, value in (("seed", 7), ("dataset.validation_fraction", 0.3), ("dataset.contract.features.0.high", 99.0)):
        cfg = copy.deepcopy(base_cfg)
        OmegaConf.update(cfg, key, value)
        assert own_split(cfg, site).fingerprint == first, key
    other = read_site_settings(sites[101])  # another site's file: another account
    assert own_split(base_cfg, other).fingerprint != first


@pytest.mark.simulation  # reads a site's file through the ClientApp's loader: over a second under load
def test_sites_standardise_with_the_federated_statistics_and_keep_their_data_fingerprint(base_cfg, tmp_path):
    """Training rows are scaled by dataset.statistics, yet charged to the same per-data account as
    the statistics release (the fingerprint is taken under the declared scaling)."""
    from fedguard.clients.app import load_local_data

    sites = wine_sites(tmp_path, state=False)
    site = read_site_settings(sites[100])
    declared = load_local_data(_cfg(base_cfg), site)
    cfg = _cfg(base_cfg)
    outcome = run_preprocessing(LoopbackGrid(sites), cfg, _yaml(cfg), LINEAGE, timeout=60)
    cfg.dataset.statistics = outcome.statistics
    federated = load_local_data(cfg, site)
    assert federated.fingerprint == declared.fingerprint == own_split(cfg, site).fingerprint
    alcohol = outcome.statistics["features"]["alcohol"]
    raw = own_split(cfg, site).train_records.numeric[:, 0]
    np.testing.assert_allclose(federated.train_x[:, 0], (raw - alcohol["mean"]) / alcohol["std"], rtol=1e-5)
    assert not np.allclose(federated.train_x[:, 0], declared.train_x[:, 0])


@pytest.mark.simulation  # three sites read through the real ClientApp
def test_a_reply_whose_sums_do_not_fit_the_contract_is_not_used(base_cfg, tmp_path):
    """A site (or a forged reply) sending a vector of the wrong length, or NaN, is named and left out."""
    from flwr.app import ConfigRecord, Message, RecordDict

    from fedguard.clients.wire import protocol

    class ForgingGrid(LoopbackGrid):
        def send_and_receive(self, messages, *, timeout=None):
            replies = super().send_and_receive(messages, timeout=timeout)
            forged = RecordDict({protocol.PREPROCESS_KEY: ConfigRecord({protocol.PREPROCESS_SUMS_FIELD: [1.0, float("nan")]})})
            replies[1] = Message(forged, reply_to=self.sent[1])
            return replies

    cfg = _cfg(base_cfg)
    sites = wine_sites(tmp_path, state=False)
    outcome = run_preprocessing(ForgingGrid(sites), cfg, _yaml(cfg), LINEAGE, timeout=60)
    assert outcome.sites == 2 and set(outcome.failures) == {101}
    assert "unusable statistics" in outcome.failures[101]
