"""What a sample-level DP epsilon states, and what leaves a DP client outside it.

A number without its neighbouring relation and its observers is not a claim. The
accountants (Opacus RDP/PRV, and the audit's dp_accounting) analyse the Poisson-subsampled
Gaussian mechanism for datasets that differ by adding or removing one record. Everything a
client sends besides its noised update is listed here, with how it is treated, so
summary.json and the README say the same thing.
"""

from __future__ import annotations

from typing import Any

# The relation every sample-level epsilon here is stated for (also written to each ledger entry).
NEIGHBOURING_RELATION = "add-or-remove-one-record"
NEIGHBOURING_RELATIONS = (NEIGHBOURING_RELATION,)

# Sent with every DP update; functions of the site's dataset size (N) and batch size only.
# The guarantee treats N as public: an observer who does not know N learns it (to within the
# batch size from q and steps, exactly from the example count), nothing about any record's content.
PUBLIC_DATASET_SIZE = {
    "num-examples": "the site's exact training-set size N (FedAvg weight): public by assumption",
    "sample_rate": "q = 1 / ceil(N / batch_size): public by assumption",
    "steps": "local steps = planned steps (epochs x ceil(N / batch_size), or max_steps): public by assumption",
}
# Computed from private records without noise: sent only when the run opts in.
UNACCOUNTED_METRICS = {
    "train_loss": "mean training loss over the round's batches",
    "eval_loss/eval_accuracy": "local-validation metrics (federated evaluation)",
}


def sample_dp_claim(release_unaccounted_metrics: bool) -> dict[str, Any]:
    """The claim summary.json states beside the per-client epsilons."""
    return {
        "neighbouring_relation": NEIGHBOURING_RELATION,
        "observers": "the server, other sites, eavesdroppers and users of any released model",
        "treated_as_public": dict(PUBLIC_DATASET_SIZE),
        "unaccounted_releases": dict(UNACCOUNTED_METRICS) if release_unaccounted_metrics else {},
    }
