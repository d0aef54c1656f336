"""Per-client and federation spend: recomputed epsilons, mismatches, budgets.

Check rules (documented in the report):

* sample level, run accountant ``rdp``: every event's reported epsilon is compared with
  the dp_accounting RDP figure of the client's history up to and including that event.
* sample level, run accountant ``prv``: every event is compared with PLD (a history
  prefix each; the one-step PLDs are cached per (σ, q)).
* sample level, q and steps: recomputed from what the site signed (batch size, dataset
  size, local epochs, max_steps; privacy/audit/commitments.py), never taken from the
  stated figures alone; entries without those fields are listed as "q not verifiable".
* sample level, ``preprocessing_release`` (federated standardization statistics): one Gaussian
  step at sampling rate 1 in the client's history, its noise multiplier taken as
  ``min(stated, noise_std / sqrt(1 + 2 numeric + categorical))``: the sensitivity of the
  bounded sums vector (count, first and second moments in [-1, 1] and [0, 1], one count
  per categorical feature), written out here rather than taken from the code under audit.
* federation (``client_dp_release``): every event, Poisson via RDP or PLD as above,
  fixed-size cohorts via RDP without replacement (replace-one neighbours). The noise
  multiplier used is ``min(stated, noise_std / clip_norm)``: what the noise really was.
  With adaptive clipping the round also released the clip count (noise ``count_noise_std``
  σ_b on a sum of sensitivity ½), and the figure from the noise is the one Gaussian both
  parts amount to, (σ_Δ⁻² + (2σ_b)⁻²)^(−1/2) with σ_Δ = noise_std / clip_norm (Andrew et al.
  2021, Theorem 1), written out here rather than taken from the code under audit.
* a budget is exceeded when the reported epsilon is over it, or the same-method
  recomputation is over it by more than the tolerance.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from fedguard.privacy.audit import commitments, recompute
from fedguard.privacy.audit.verify import AttributedEvent
from fedguard.privacy.ledger_events import BudgetRefusal, ClientDpRelease, PreprocessingRelease, RunStarted, SampleDpTraining

# A stated noise multiplier may differ from noise_std / clip_norm by float round-off only.
NOISE_CONSISTENCY_RTOL = 1e-6
# Adaptive clipping: one client moves the sum of centred clip indicators (b - 1/2) by at most this.
CLIP_COUNT_SENSITIVITY = 0.5
# Reported budgets are compared with reported epsilons at the client's own slack.
BUDGET_SLACK = 1e-9

OK, MISMATCH, OVER_BUDGET = "ok", "MISMATCH", "OVER BUDGET"


@dataclass
class TimelinePoint:
    round: int
    reported: float
    recomputed: float | None  # same method; None where not recomputed per event (PRV)


@dataclass
class SpendAudit:
    """One party's spend: a client (sample level) or the federation (client level)."""

    name: str
    rounds: int = 0
    steps: int = 0
    refusals: int = 0
    delta: float | None = None
    accountant: str = "-"
    epsilon_reported: float = 0.0
    epsilon_same_method: float | None = None
    epsilon_pld: float | None = None
    budget: float | None = None
    budget_exceeded: bool = False
    mismatches: list[str] = field(default_factory=list)
    timeline: list[TimelinePoint] = field(default_factory=list)
    assumptions: str = ""
    unverified: list[str] = field(default_factory=list)  # what could not be recomputed (old entries)

    @property
    def status(self) -> str:
        if self.mismatches:
            return MISMATCH
        return OVER_BUDGET if self.budget_exceeded else OK

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rounds": self.rounds,
            "steps": self.steps,
            "refusals": self.refusals,
            "delta": self.delta,
            "accountant": self.accountant,
            "epsilon_reported": self.epsilon_reported,
            "epsilon_recomputed": _json_number(self.epsilon_same_method),
            "epsilon_pld": _json_number(self.epsilon_pld),
            "budget": self.budget,
            "budget_exceeded": self.budget_exceeded,
            "mismatches": list(self.mismatches),
            "status": self.status,
            "assumptions": self.assumptions,
            "unverified": list(self.unverified),
            "timeline": [vars(point) | {"recomputed": _json_number(point.recomputed)} for point in self.timeline],
        }


def _json_number(value: float | None) -> float | str | None:
    if value is not None and not math.isfinite(value):
        return "inf"
    return value


def _check_budget(audit: SpendAudit, tolerance: float) -> None:
    if audit.budget is None:
        return
    over_reported = audit.epsilon_reported > audit.budget + BUDGET_SLACK
    recomputed = audit.epsilon_same_method
    over_recomputed = recomputed is not None and recomputed > audit.budget * (1 + tolerance) + recompute.ABSOLUTE_SLACK
    audit.budget_exceeded = over_reported or over_recomputed


def _check_monotone(audit: SpendAudit) -> None:
    for before, after in zip(audit.timeline, audit.timeline[1:]):
        if after.reported < before.reported - recompute.ABSOLUTE_SLACK:
            audit.mismatches.append(
                f"reported epsilon fell from {before.reported:.6g} (round {before.round}) "
                f"to {after.reported:.6g} (round {after.round}); cumulative epsilon cannot decrease"
            )
            return


def audit_client(name: str, events: list[AttributedEvent], tolerance: float, with_pld: bool = True) -> SpendAudit:
    """Sample-level spend of one client from its ``sample_dp_training`` / ``budget_refusal`` events."""
    audit = SpendAudit(name=name, assumptions="Poisson-subsampled Gaussian (DP-SGD), add/remove-one record")
    history: list[tuple[float, float, int]] = []
    last_delta: float | None = None
    for event in events:
        body = event.body
        if event.kind == PreprocessingRelease.kind:
            history.append((_preprocessing_sigma(body, audit), 1.0, 1))
            audit.steps += 1
            _note_release(audit, body, history, tolerance, label="preprocessing")
            continue
        if event.kind == BudgetRefusal.kind:
            audit.refusals += 1
            audit.budget = body["budget_epsilon"] if body["budget_epsilon"] is not None else audit.budget
            continue
        rate, steps, problems = commitments.check_entry(body)
        audit.mismatches.extend(problems)
        if commitments.committed(body) is None and commitments.NOT_VERIFIABLE not in audit.unverified:
            audit.unverified.append(commitments.NOT_VERIFIABLE)
        history.append((body["noise_multiplier"], rate, steps))
        audit.rounds += 1
        audit.steps += steps
        audit.accountant, audit.delta, audit.epsilon_reported = body["accountant"], body["delta"], body["epsilon"]
        if body["budget_epsilon"] is not None:
            audit.budget = body["budget_epsilon"]
        if last_delta is not None and body["delta"] != last_delta:
            audit.mismatches.append(f"delta changed from {last_delta:g} to {body['delta']:g} in round {body['round']}")
        last_delta = body["delta"]
        method = "RDP" if body["accountant"] == "rdp" else "PLD"
        epsilon_of = recompute.rdp_epsilon if method == "RDP" else recompute.pld_epsilon
        recomputed = epsilon_of(recompute.merge(history), body["delta"])
        if recompute.exceeds(recomputed, body["epsilon"], tolerance):
            audit.mismatches.append(
                f"round {body['round']}: reported {body['epsilon']:.6g}, {method} recomputed {recomputed:.6g}"
            )
        audit.timeline.append(TimelinePoint(int(body["round"]), float(body["epsilon"]), recomputed))
    if not history:
        return audit
    merged = recompute.merge(history)
    audit.epsilon_pld = recompute.pld_epsilon(merged, audit.delta) if with_pld or audit.accountant == "prv" else None
    audit.epsilon_same_method = audit.timeline[-1].recomputed
    _check_monotone(audit)
    _check_budget(audit, tolerance)
    return audit


def _preprocessing_sigma(body: dict[str, Any], audit: SpendAudit) -> float:
    """The noise multiplier the statistics release really had: noise std over the vector's sensitivity."""
    sensitivity = math.sqrt(1 + 2 * int(body["numeric"]) + int(body["categorical"]))
    from_noise = float(body["noise_std"]) / sensitivity
    stated = float(body["noise_multiplier"])
    if from_noise < stated * (1 - NOISE_CONSISTENCY_RTOL):
        audit.mismatches.append(
            f"preprocessing: noise_multiplier {stated:g} but noise_std/sensitivity = {from_noise:g}"
        )
    return min(stated, from_noise)


def _note_release(
    audit: SpendAudit, body: dict[str, Any], history: list[tuple[float, float, int]], tolerance: float, label: str
) -> None:
    """Recompute the cumulative epsilon after a release and compare it with the stated one."""
    audit.accountant, audit.delta, audit.epsilon_reported = body["accountant"], body["delta"], body["epsilon"]
    if body.get("budget_epsilon") is not None:
        audit.budget = body["budget_epsilon"]
    method = "RDP" if body["accountant"] == "rdp" else "PLD"
    epsilon_of = recompute.rdp_epsilon if method == "RDP" else recompute.pld_epsilon
    recomputed = epsilon_of(recompute.merge(history), body["delta"])
    if recompute.exceeds(recomputed, body["epsilon"], tolerance):
        audit.mismatches.append(f"{label}: reported {body['epsilon']:.6g}, {method} recomputed {recomputed:.6g}")
    audit.timeline.append(TimelinePoint(int(body.get("round", 0)), float(body["epsilon"]), recomputed))


def _with_clip_count(update_sigma: float, count_std: float) -> float:
    """One Gaussian equivalent to the update sum at σ_Δ plus the clip count at noise std σ_b."""
    count_sigma = count_std / CLIP_COUNT_SENSITIVITY
    if update_sigma <= 0 or count_sigma <= 0:
        return 0.0
    return (update_sigma**-2 + count_sigma**-2) ** -0.5


def _effective_sigma(body: dict[str, Any], audit: SpendAudit) -> float:
    from_noise = body["noise_std"] / body["clip_norm"]
    what = "noise_std/clip_norm"
    if body.get("clipping", "fixed") == "adaptive":
        stated_update = body["update_noise_multiplier"]
        if not math.isclose(from_noise, stated_update, rel_tol=NOISE_CONSISTENCY_RTOL):
            audit.mismatches.append(
                f"round {body['round']}: update_noise_multiplier {stated_update:g} but noise_std/clip_norm = {from_noise:g}"
            )
        from_noise = _with_clip_count(min(from_noise, stated_update), body["count_noise_std"])
        what = "(noise_std/clip_norm, count_noise_std) combined"
    stated = body["noise_multiplier"]
    if not math.isclose(from_noise, stated, rel_tol=NOISE_CONSISTENCY_RTOL):
        audit.mismatches.append(f"round {body['round']}: noise_multiplier {stated:g} but {what} = {from_noise:g}")
    surviving = _surviving_sigma(body)
    if surviving is not None and stated > surviving * (1 + NOISE_CONSISTENCY_RTOL):
        audit.mismatches.append(
            f"round {body['round']}: noise_multiplier {stated:g} but {body['survivors']} survivors of an expected "
            f"{body['expected_cohort']:g} leave {surviving:g} of the distributed noise"
        )
        return min(stated, from_noise, surviving)
    return min(stated, from_noise)


def _surviving_sigma(body: dict[str, Any]) -> float | None:
    """Distributed noise: σ recomputed from the planned shares that survived (s of n each add
    1/n of the variance, so each part keeps √(s/n) of its std); None where not recorded."""
    if body.get("noise") != "distributed" or not body.get("expected_cohort") or body.get("planned_update_noise_multiplier") is None:
        return None
    scale = math.sqrt(min(1.0, body["survivors"] / body["expected_cohort"]))
    update = body["planned_update_noise_multiplier"] * scale
    if body.get("planned_count_noise_std") is None:
        return update
    return _with_clip_count(update, body["planned_count_noise_std"] * scale)


def audit_federation(
    releases: list[AttributedEvent], budget: float | None, tolerance: float, with_pld: bool = True
) -> SpendAudit | None:
    """Client-level (DP-FedAvg) spend of the federation from ``client_dp_release`` events."""
    if not releases:
        return None
    audit = SpendAudit(name="federation", budget=budget)
    poisson: list[tuple[float, float, int]] = []
    fixed: list[tuple[float, int, int]] = []
    adaptive = any(event.body.get("clipping") == "adaptive" for event in releases)
    for event in releases:
        body = event.body
        sigma = _effective_sigma(body, audit)
        audit.rounds += 1
        audit.steps += 1
        audit.accountant, audit.delta, audit.epsilon_reported = body["accountant"], body["delta"], body["epsilon"]
        if body["sampling"] == "fixed":
            if not body.get("population"):
                audit.mismatches.append(f"round {body['round']}: fixed-size sampling without population size")
                continue
            fixed.append((sigma, int(body["population"]), int(body["cohort_size"])))
        else:
            poisson.append((sigma, body["sample_rate"], 1))
        recomputed = None
        if fixed and poisson:
            audit.mismatches.append("run mixes Poisson and fixed-size sampling; not recomputed")
        elif fixed:
            recomputed = recompute.fixed_size_rdp_epsilon(tuple(fixed), body["delta"])
        elif body["accountant"] == "rdp":
            recomputed = recompute.rdp_epsilon(recompute.merge(poisson), body["delta"])
        if recomputed is not None and recompute.exceeds(recomputed, body["epsilon"], tolerance):
            audit.mismatches.append(f"round {body['round']}: reported {body['epsilon']:.6g}, recomputed {recomputed:.6g}")
        audit.timeline.append(TimelinePoint(int(body["round"]), float(body["epsilon"]), recomputed))
    if fixed and not poisson:
        audit.assumptions = "fixed-size cohorts, sampling without replacement, Gaussian, replace-one client (RDP)"
        audit.epsilon_same_method = audit.timeline[-1].recomputed if audit.timeline else None
    elif poisson and not fixed:
        audit.assumptions = "Poisson-sampled cohorts, Gaussian on the clipped sum, add/remove-one client"
        merged = recompute.merge(poisson)
        audit.epsilon_pld = recompute.pld_epsilon(merged, audit.delta) if with_pld or audit.accountant == "prv" else None
        if audit.accountant == "prv":
            audit.epsilon_same_method = audit.epsilon_pld
            if recompute.exceeds(audit.epsilon_pld, audit.epsilon_reported, tolerance):
                audit.mismatches.append(f"final: reported {audit.epsilon_reported:.6g}, PLD {audit.epsilon_pld:.6g}")
        else:
            audit.epsilon_same_method = audit.timeline[-1].recomputed
    if adaptive:
        audit.assumptions += "; adaptive clipping: update sum and clip count as one Gaussian (Andrew et al. 2021, Thm 1)"
    _check_monotone(audit)
    _check_budget(audit, tolerance)
    return audit


@dataclass
class SpendResult:
    clients: dict[str, SpendAudit]
    federation: SpendAudit | None
    run: dict[str, Any]  # the run_started body (empty if none)


def client_sort_key(name: str) -> tuple[int, int | str]:
    return (0, int(name)) if name.isdigit() else (1, name)


def audit_spend(events: list[AttributedEvent], tolerance: float, with_pld: bool = True) -> SpendResult:
    per_client: dict[str, list[AttributedEvent]] = defaultdict(list)
    releases: list[AttributedEvent] = []
    run: dict[str, Any] = {}
    for event in events:
        if event.kind in (SampleDpTraining.kind, BudgetRefusal.kind, PreprocessingRelease.kind):
            per_client[str(event.body["client"])].append(event)
        elif event.kind == ClientDpRelease.kind:
            releases.append(event)
        elif event.kind == RunStarted.kind and not run and not event.embedded:  # the server's, not a site's
            run = dict(event.body)
    clients = {
        name: audit_client(name, per_client[name], tolerance, with_pld)
        for name in sorted(per_client, key=client_sort_key)
    }
    federation = audit_federation(releases, run.get("federation_budget_epsilon"), tolerance, with_pld)
    return SpendResult(clients=clients, federation=federation, run=run)
