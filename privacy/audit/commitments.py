"""Rebuild a DP-SGD entry's sample rate and steps from what the site committed to.

A site's entry states (σ, q, steps); epsilon falls with q and with the steps, so an audit
that recomputes epsilon from the stated q and steps only checks the site's arithmetic, not
its claim (issue #14: q = 0.005 instead of 0.01 passed with epsilon 0.96 for 1.71). The
site also signs its logical batch size B, its training-set size N, its local epochs and
max_steps; from those the audit derives q = 1/ceil(N/B) (the rate of Opacus's
DPDataLoader, which draws each record with probability 1/len(loader)) and the steps
epochs·ceil(N/B), capped at max_steps, written out here rather than taken from the client.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# q is 1/integer on both sides; anything beyond float round-off is a different q.
RATE_RTOL = 1e-9
NOT_VERIFIABLE = "q not verifiable"


@dataclass(frozen=True)
class Committed:
    """What one entry's q and steps must be, from the site's committed fields."""

    sample_rate: float
    steps: int


def committed(body: dict[str, Any]) -> Committed | None:
    """The q and steps the entry's committed fields imply; None for entries without them."""
    batch, size, epochs = body.get("batch_size"), body.get("dataset_size"), body.get("local_epochs")
    if batch is None or size is None or epochs is None:
        return None
    batches_per_epoch = math.ceil(int(size) / int(batch))
    steps = int(epochs) * batches_per_epoch
    if body.get("max_steps") is not None:
        steps = min(steps, int(body["max_steps"]))
    return Committed(1.0 / batches_per_epoch, steps)


def check_entry(body: dict[str, Any]) -> tuple[float, int, list[str]]:
    """(q, steps) to account for this entry, and the mismatches found.

    Where the stated figures differ from the committed ones, the larger of each is used, so a
    lie can only raise the recomputed epsilon."""
    stated_rate, stated_steps = float(body["sample_rate"]), int(body["steps"])
    expected = committed(body)
    if expected is None:
        return stated_rate, stated_steps, []
    problems = []
    if not math.isclose(stated_rate, expected.sample_rate, rel_tol=RATE_RTOL):
        problems.append(
            f"round {body['round']}: sample_rate {stated_rate:.6g} but the committed batch_size {body['batch_size']} "
            f"and dataset_size {body['dataset_size']} give {expected.sample_rate:.6g}"
        )
    if stated_steps != expected.steps:
        problems.append(f"round {body['round']}: {stated_steps} steps but the committed training gives {expected.steps}")
    return max(stated_rate, expected.sample_rate), max(stated_steps, expected.steps), problems
