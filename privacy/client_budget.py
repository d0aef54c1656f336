"""A client's sample-level privacy state, kept across rounds in the client's persistent
state (Flower's ``Context.state`` holds it as a ConfigRecord of these plain values).

Flower's Opacus example builds a fresh PrivacyEngine each round and so reports one
round's epsilon as if it were the run's. Here the calibrated noise, the sample rate
and the whole (sigma, q, steps) history live in the client's persistent state, so
every reported epsilon is cumulative and every budget check sees all past rounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any

from fedguard.privacy.accounting import HistoryEntry, compute_epsilon, merge_history

STATE_KEY = "fedguard.sample-dp"
# Budget comparisons allow for float round-off in the accountant, nothing more.
BUDGET_SLACK = 1e-9


class PrivacyStateError(ValueError):
    """The persisted privacy state is malformed; training must not go on without it."""


@dataclass
class ClientPrivacyState:
    noise_multiplier: float
    sample_rate: float
    delta: float
    accountant: str
    budget_epsilon: float | None
    history: list[HistoryEntry] = field(default_factory=list)
    rounds_participated: int = 0
    # Spend on the same training set under other lineages (clients/data_spend.py): counted in
    # every epsilon and budget check, since the records are the same, but never trained into.
    prior_history: list[HistoryEntry] = field(default_factory=list)

    @property
    def total_steps(self) -> int:
        return sum(steps for _, _, steps in self.history)

    def epsilon(self, extra: list[HistoryEntry] | None = None) -> tuple[float, str]:
        report = compute_epsilon(self.prior_history + self.history + (extra or []), self.delta, self.accountant)
        return report.epsilon, report.accountant

    def fits_budget(self, planned_steps: int) -> tuple[bool, float]:
        """Would ``planned_steps`` more steps stay within the budget? Returns (fits, epsilon after)."""
        after, _ = self.epsilon([(self.noise_multiplier, self.sample_rate, planned_steps)])
        if self.budget_epsilon is None:
            return True, after
        return after <= self.budget_epsilon + BUDGET_SLACK, after

    def tighten(self, *budgets: float | None) -> None:
        """Apply the strictest of the stored budget and ``budgets``: a budget a site gives later
        may lower the cap, never raise it."""
        given = [float(b) for b in (self.budget_epsilon, *budgets) if b is not None]
        self.budget_epsilon = min(given) if given else None

    def to_dict(self) -> dict[str, Any]:
        """Plain values (numbers, strings, lists of them) for the client's persistent state."""
        merged = merge_history(self.history)
        return {
            "noise_multiplier": float(self.noise_multiplier),
            "sample_rate": float(self.sample_rate),
            "delta": float(self.delta),
            "accountant": self.accountant,
            "budget_epsilon": -1.0 if self.budget_epsilon is None else float(self.budget_epsilon),
            "history_sigma": [float(s) for s, _, _ in merged],
            "history_rate": [float(q) for _, q, _ in merged],
            "history_steps": [int(n) for _, _, n in merged],
            "rounds_participated": int(self.rounds_participated),
        }

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> ClientPrivacyState:
        try:
            sigmas, rates, steps = (list(record[k]) for k in ("history_sigma", "history_rate", "history_steps"))
            if not len(sigmas) == len(rates) == len(steps):
                raise PrivacyStateError("history columns differ in length")
            budget = float(record["budget_epsilon"])
            state = cls(
                noise_multiplier=float(record["noise_multiplier"]),
                sample_rate=float(record["sample_rate"]),
                delta=float(record["delta"]),
                accountant=str(record["accountant"]),
                budget_epsilon=None if budget < 0 else budget,
                history=[(float(s), float(q), int(n)) for s, q, n in zip(sigmas, rates, steps)],
                rounds_participated=int(record["rounds_participated"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise PrivacyStateError(f"client privacy state is malformed: {err}") from err
        bad = [e for e in state.history if not (math.isfinite(e[0]) and e[0] >= 0 and 0 < e[1] <= 1 and e[2] >= 0)]
        if bad:
            raise PrivacyStateError(f"client privacy state holds impossible history entries: {bad[:3]}")
        return state

    def report(self, *, steps_this_round: int, refused: bool, reason: str = "") -> dict[str, Any]:
        """What the client tells the server about its spend (a ConfigRecord's worth)."""
        epsilon, accountant = self.epsilon()
        return {
            "epsilon": epsilon,
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps_round": int(steps_this_round),
            "steps_total": self.total_steps,
            "rounds_participated": self.rounds_participated,
            "accountant": accountant,
            "budget_epsilon": -1.0 if self.budget_epsilon is None else self.budget_epsilon,
            "refused": refused,
            "reason": reason,
        }
