"""The privacy events a ledger records, one dataclass per entry ``kind``.

Bodies are plain JSON objects (``dataclasses.asdict``); ``None`` means "not set" (e.g.
no budget). Constructors validate what the audit later relies on, so a malformed
event fails where it is produced, not months later in an audit.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from fedguard.privacy.sample_dp_claim import NEIGHBOURING_RELATION, NEIGHBOURING_RELATIONS

ACCOUNTANTS = ("rdp", "prv")
SAMPLING_METHODS = ("poisson", "fixed")
CLIPPING_MODES = ("fixed", "adaptive")
# ClientPrivacyState.report writes -1 for "no budget"; the ledger writes null.
NO_BUDGET_SENTINEL = -1.0


class EventError(ValueError):
    """An event that cannot be recorded as given."""


def config_hash(config_text: str) -> str:
    """SHA-256 of the resolved config, tying a ledger to the exact settings of its run."""
    return hashlib.sha256(config_text.encode("utf-8")).hexdigest()


def _finite(name: str, value: float, *, positive: bool = False) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise EventError(f"{name}={value} must be finite and {'> 0' if positive else '>= 0'}")
    return value


def _rate(name: str, value: float) -> float:
    value = float(value)
    if not 0 < value <= 1:
        raise EventError(f"{name}={value} must lie in (0, 1]")
    return value


def _budget(value: float | None) -> float | None:
    if value is None or float(value) == NO_BUDGET_SENTINEL:
        return None
    return _finite("budget_epsilon", value, positive=True)


def _accountant(value: str) -> str:
    if value not in ACCOUNTANTS:
        raise EventError(f"accountant={value!r}; allowed: {', '.join(ACCOUNTANTS)}")
    return value


@dataclass(frozen=True)
class LedgerEvent:
    """Base: ``kind`` names the entry type, ``body()`` is what gets signed."""

    kind: ClassVar[str] = ""

    def body(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RunStarted(LedgerEvent):
    kind: ClassVar[str] = "run_started"
    run_id: str
    config_hash: str
    # Client-level (federation) budget; None when the run sets none.
    federation_budget_epsilon: float | None = None
    federation_delta: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "federation_budget_epsilon", _budget(self.federation_budget_epsilon))


@dataclass(frozen=True)
class SampleDpTraining(LedgerEvent):
    """One client's DP-SGD training in one round; ``epsilon`` is its cumulative spend after it."""

    kind: ClassVar[str] = "sample_dp_training"
    client: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    delta: float
    accountant: str
    epsilon: float
    budget_epsilon: float | None = None
    # What epsilon is stated for (privacy/sample_dp_claim.py); entries written before it existed read as this.
    neighbouring: str = NEIGHBOURING_RELATION
    # What the site committed to, so the audit can recompute q and the steps instead of trusting
    # them (issue #14): logical batch size, training-set size, local epochs, max_steps (None: no cap).
    # None in entries written before they existed: the audit then reports "q not verifiable".
    batch_size: int | None = None
    dataset_size: int | None = None
    local_epochs: int | None = None
    max_steps: int | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "dataset_size", "local_epochs", "max_steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or int(value) != value or int(value) < 1):
                raise EventError(f"{name}={value} must be a positive integer or null")
        if self.neighbouring not in NEIGHBOURING_RELATIONS:
            raise EventError(f"neighbouring={self.neighbouring!r}; allowed: {', '.join(NEIGHBOURING_RELATIONS)}")
        _finite("noise_multiplier", self.noise_multiplier)
        _rate("sample_rate", self.sample_rate)
        _rate("delta", self.delta)
        _finite("max_grad_norm", self.max_grad_norm, positive=True)
        _finite("epsilon", self.epsilon)
        _accountant(self.accountant)
        if int(self.steps) < 0 or int(self.round) < 0:
            raise EventError(f"steps={self.steps} and round={self.round} must be >= 0")
        object.__setattr__(self, "client", str(self.client))
        object.__setattr__(self, "budget_epsilon", _budget(self.budget_epsilon))

    @classmethod
    def from_report(
        cls, report: dict[str, Any], *, client: int | str, server_round: int, max_grad_norm: float,
        committed: dict[str, int | None] | None = None,
    ) -> SampleDpTraining:
        """Build from ``ClientPrivacyState.report(...)`` (the dict a client already sends) and
        ``committed``: the site's batch_size, dataset_size, local_epochs, max_steps."""
        return cls(
            client=str(client),
            round=int(server_round),
            noise_multiplier=float(report["noise_multiplier"]),
            sample_rate=float(report["sample_rate"]),
            steps=int(report["steps_round"]),
            max_grad_norm=float(max_grad_norm),
            delta=float(report["delta"]),
            accountant=str(report["accountant"]),
            epsilon=float(report["epsilon"]),
            budget_epsilon=float(report["budget_epsilon"]),
            **(committed or {}),
        )


@dataclass(frozen=True)
class BudgetRefusal(LedgerEvent):
    """A client declined a round because the planned steps would exceed its budget."""

    kind: ClassVar[str] = "budget_refusal"
    client: str
    round: int
    planned_steps: int
    epsilon_spent: float
    epsilon_if_trained: float
    budget_epsilon: float | None
    reason: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "client", str(self.client))
        object.__setattr__(self, "budget_epsilon", _budget(self.budget_epsilon))


@dataclass(frozen=True)
class ClientDpRelease(LedgerEvent):
    """A server-side client-level DP release (DP-FedAvg): one noised aggregate per round.

    ``epsilon`` is the federation's cumulative client-level epsilon reported after it.
    ``population`` (clients in the federation) is needed to audit ``fixed`` sampling.
    ``noise_std`` is the std of the noise on the update sum, ``clip_norm`` the round's C.
    With ``clipping="adaptive"`` the round also released the clip count, with noise std
    ``count_noise_std`` (σ_b); ``update_noise_multiplier`` is σ_Δ = noise_std / clip_norm and
    ``noise_multiplier`` the combined σ (σ⁻² = σ_Δ⁻² + (2σ_b)⁻²) the accountant used. All are
    the noise that really reached the released sums (after dropouts under distributed noise).
    """

    kind: ClassVar[str] = "client_dp_release"
    round: int
    clip_norm: float
    noise_std: float
    noise_multiplier: float
    sampling: str
    sample_rate: float
    cohort_size: int
    survivors: int
    delta: float
    accountant: str
    epsilon: float
    population: int | None = None
    clipping: str = "fixed"
    update_noise_multiplier: float | None = None
    count_noise_std: float | None = None
    # Epsilon against the server operator, who knows the cohorts (no amplification); None where
    # it sees updates before their noise (central noise) or the entry predates the field.
    epsilon_server_operator: float | None = None
    # Distributed noise: each of the expected cohort's clients added 1/expected_cohort of the planned
    # variance, so the audit recomputes σ from the survivors instead of trusting the stated one.
    noise: str = "central"
    expected_cohort: float | None = None
    planned_update_noise_multiplier: float | None = None
    planned_count_noise_std: float | None = None

    def __post_init__(self) -> None:
        _finite("clip_norm", self.clip_norm, positive=True)
        if self.noise not in ("central", "distributed"):
            raise EventError(f"noise={self.noise!r}; allowed: central, distributed")
        for name in ("expected_cohort", "planned_update_noise_multiplier", "planned_count_noise_std"):
            if getattr(self, name) is not None:
                _finite(name, getattr(self, name))
        if self.epsilon_server_operator is not None:
            _finite("epsilon_server_operator", self.epsilon_server_operator)
        if self.clipping not in CLIPPING_MODES:
            raise EventError(f"clipping={self.clipping!r}; allowed: {', '.join(CLIPPING_MODES)}")
        if self.clipping == "adaptive" and (self.update_noise_multiplier is None or self.count_noise_std is None):
            raise EventError("an adaptive-clipping release must state update_noise_multiplier and count_noise_std")
        for name in ("update_noise_multiplier", "count_noise_std"):
            if getattr(self, name) is not None:
                _finite(name, getattr(self, name))
        _finite("noise_std", self.noise_std)
        _finite("noise_multiplier", self.noise_multiplier)
        _rate("sample_rate", self.sample_rate)
        _rate("delta", self.delta)
        _finite("epsilon", self.epsilon)
        _accountant(self.accountant)
        if self.sampling not in SAMPLING_METHODS:
            raise EventError(f"sampling={self.sampling!r}; allowed: {', '.join(SAMPLING_METHODS)}")
        if not 0 <= int(self.survivors) <= int(self.cohort_size):
            raise EventError(f"survivors={self.survivors} must lie in [0, cohort_size={self.cohort_size}]")


@dataclass(frozen=True)
class RunResumed(LedgerEvent):
    kind: ClassVar[str] = "run_resumed"
    run_id: str
    from_round: int
    reason: str = ""


@dataclass(frozen=True)
class PreprocessingRelease(LedgerEvent):
    """A site's noisy standardization sums, released once before training (privacy/preprocessing.py).

    ``numeric`` and ``categorical`` give the vector's layout, from which the audit recomputes the
    sensitivity ``sqrt(1 + 2 numeric + categorical)`` itself; ``noise_std`` is what was added.
    Accounted as one Gaussian step at sampling rate 1; ``epsilon`` is the site's cumulative spend
    on its data after it."""

    kind: ClassVar[str] = "preprocessing_release"
    client: str
    noise_multiplier: float
    noise_std: float
    numeric: int
    categorical: int
    delta: float
    accountant: str
    epsilon: float
    budget_epsilon: float | None = None
    round: int = 0

    def __post_init__(self) -> None:
        _finite("noise_multiplier", self.noise_multiplier)
        _finite("noise_std", self.noise_std)
        _rate("delta", self.delta)
        _finite("epsilon", self.epsilon)
        _accountant(self.accountant)
        for name in ("numeric", "categorical"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or int(value) < 0:
                raise EventError(f"{name}={value} must be a non-negative integer")
        object.__setattr__(self, "client", str(self.client))
        object.__setattr__(self, "budget_epsilon", _budget(self.budget_epsilon))


@dataclass(frozen=True)
class RunFinished(LedgerEvent):
    kind: ClassVar[str] = "run_finished"
    run_id: str
    rounds: int
    stop_reason: str = ""


CLIENT_ENTRY_KIND = "client_entry"
EVENT_TYPES: dict[str, type[LedgerEvent]] = {
    cls.kind: cls
    for cls in (RunStarted, SampleDpTraining, BudgetRefusal, ClientDpRelease, RunResumed, RunFinished, PreprocessingRelease)
}
KNOWN_KINDS = frozenset(EVENT_TYPES) | {CLIENT_ENTRY_KIND}
