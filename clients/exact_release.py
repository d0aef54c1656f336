"""At most one exact (noise-free) masked statistics release per set of files, whatever the run.

Without DP, a site's statistics are a deterministic function of its files. SecAgg+ hides them
inside one sum, but a server that runs the release twice, under two run names it picks (the
lineage is the server's choice), once with a target site and once without, reads the target's
exact vector as the difference of the two sums. DP releases do not need this: each one carries
fresh noise and is charged to the files' per-data account (clients/data_spend.py), so a second
release is paid for. An exact release is not, so the site refuses a second one on the same files.

The claim is a file created exclusively (``O_EXCL``) in ``<state-dir>/secagg/``, written before
anything leaves the site; two tasks racing for it cannot both win. Without a state dir the claim
lives in the task's ``Context.state``, which covers one Flower run only (simulations), and the
site logs that. An operator who wants to release again on purpose removes the claim file.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from flwr.app import ConfigRecord, Context

from fedguard.clients.secagg_identity import SECAGG_DIR

logger = logging.getLogger(__name__)

CLAIM_PREFIX = "exact-statistics-"
CLAIMS_STATE_KEY = "fedguard.exact_statistics_claims"


class ExactReleaseRefused(RuntimeError):
    """These files already went into one exact masked statistics sum."""


def claim_exact_release(context: Context, state_dir: str | None, fingerprint: str, lineage: str) -> None:
    """Record that the exact statistics of the files named by ``fingerprint`` are released now, or
    refuse if they were released before (under any lineage)."""
    if not state_dir:
        claims = context.state.get(CLAIMS_STATE_KEY)
        held = list(claims["fingerprints"]) if claims is not None else []
        if fingerprint in held:
            raise ExactReleaseRefused(_refusal(lineage))
        logger.warning("no state-dir for this site: its exact statistics release is remembered for this run only")
        context.state[CLAIMS_STATE_KEY] = ConfigRecord({"fingerprints": [*held, fingerprint]})
        return
    folder = Path(state_dir) / SECAGG_DIR
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    claim = folder / f"{CLAIM_PREFIX}{fingerprint}.json"
    try:
        descriptor = os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        logger.error("refusing a second exact statistics release (run %s); remove %s to allow one more on purpose",
                     lineage, claim)
        raise ExactReleaseRefused(_refusal(lineage)) from None
    with os.fdopen(descriptor, "w") as handle:
        handle.write(json.dumps({"lineage": lineage}))
        handle.flush()
        os.fsync(handle.fileno())


def _refusal(lineage: str) -> str:
    """What the server hears: why, without the site's paths (the site's log names the claim file)."""
    return (f"this site's files already went into an exact (noise-free) masked statistics sum; another one, "
            f"under run {lineage} or any other, would let the server subtract two sums and read this site's "
            f"statistics, so it is refused")
