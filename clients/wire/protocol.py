"""Names of the records and keys the ServerApp and ClientApp exchange.

Kept in one place so both sides agree; Flower's strategies fix ``arrays``,
``config`` and ``num-examples``.
"""

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"

# Inside the ConfigRecord sent to clients.
FEDGUARD_CONFIG_KEY = "fedguard-config"
SERVER_ROUND_KEY = "server-round"
PROXIMAL_MU_KEY = "proximal-mu"
# The federation's id across resumes; sites key their saved privacy state on it.
LINEAGE_KEY = "lineage-id"
# Client-level DP with adaptive clipping: the round's clip norm C, set by the server.
CLIENT_CLIP_NORM_KEY = "client-clip-norm"

# ConfigRecord in train replies with the client's privacy report (sample-level DP);
# a reply holding only this record, with refused=True, is a budget refusal.
PRIVACY_KEY = "privacy"
PARTITION_ID_KEY = "partition-id"
# ConfigRecord in train replies with the site's signed privacy ledger entries (clients/site_state.py).
LEDGER_KEY = "ledger"
LEDGER_ENTRIES_FIELD = "entries"  # inside it: the entries as wire strings, oldest first
LEDGER_PUBLIC_KEY_FIELD = "public-key"  # and the site's ledger public key (OpenSSH line)
# Secure aggregation: the train reply's public keys, and each protocol stage's request and answer.
SECAGG_KEY = "secagg"
SECAGG_MESSAGE_TYPE = "train.secagg"
# ConfigRecord beside the mask answer: the senders whose shares failed authentication
# (the client left them out of its masks), under SECAGG_REJECTED_FIELD.
SECAGG_REJECTED_KEY = "secagg-rejected"
# In a SecAgg+ round's train config: the server's random id for this run of the protocol
# (bytes). Sites sign it with their round keys, so signed keys cannot be replayed into
# another session of the same round.
SECAGG_SESSION_KEY = "secagg-session"
SECAGG_SESSION_BYTES = 16
SECAGG_REJECTED_FIELD = "from"
# In the same record: the neighbours the client masked with and its identity key's signature on
# them (privacy/secagg/identity.py::partners_bytes). The server relays each survivor's pair to
# its neighbours in the unmask request (a neighbour not on the list keeps that seed share).
SECAGG_PARTNERS_FIELD = "partners"
SECAGG_PARTNERS_SIGNATURE_FIELD = "partners-signature"


def partner_list_bytes(partners: list[int] | set[int]) -> bytes:
    """One survivor's mask partners as one ConfigRecord value (records hold no nested lists)."""
    return ",".join(str(int(node)) for node in sorted(partners)).encode()


def partner_list_from_bytes(data: bytes) -> set[int]:
    """The inverse of ``partner_list_bytes``; ValueError on anything else."""
    text = data.decode("ascii")
    return {int(part) for part in text.split(",")} if text else set()
# Client-level DP with adaptive clipping (privacy/adaptive_clipping.py): ConfigRecord holding
# the client's centred clip indicator b - 1/2 under CLIP_INDICATOR_FIELD. Sent as is in plain
# train replies; under SecAgg+ the client's secure-aggregation mod appends it (with its noise
# share) to the masked vector instead, and the aggregate reply carries the sum under the same key.
CLIP_INDICATOR_KEY = "clip-indicator"
CLIP_INDICATOR_FIELD = "value"

# Inside the MetricRecord clients reply with.
NUM_EXAMPLES_KEY = "num-examples"
TRAIN_LOSS_KEY = "train_loss"
TRAIN_STEPS_KEY = "train_steps"
EVAL_LOSS_KEY = "eval_loss"
EVAL_ACCURACY_KEY = "eval_accuracy"

# Flower run-config keys (pyproject [tool.flwr.app.config] and `flwr run --run-config`).
RUN_CONFIG_FEDGUARD = "fedguard-config"
RUN_CONFIG_RUN_DIR = "run-dir"

# Federated preprocessing (clients/preprocessing.py): a query message before round 1; the reply's
# config record holds the site's (noisy) bounded sums and their layout, nothing else about its data.
PREPROCESS_MESSAGE_TYPE = "query.preprocess"
PREPROCESS_KEY = "preprocess"
PREPROCESS_SUMS_FIELD = "sums"
PREPROCESS_NUMERIC_FIELD = "numeric"
PREPROCESS_CATEGORIES_FIELD = "categories"
PREPROCESS_NOISE_STD_FIELD = "noise-std"
