"""``fedguard bench secagg-attacks``: the hostile-server attacks of fedguard's SecAgg+ tests, run against
Flower 1.41's own ``secaggplus_mod`` (real clients, in-process).

Five Flower clients (node ids 1-5; ``share_num`` 5, so each client's neighbours are the other
four, ``threshold`` 3) run Flower's mod around a stand-in training step that adds a distinct
constant to every weight. A server of our own drives them with the messages each attack needs
and tries to rebuild the target's quantized input with Flower's own crypto and masking code.
An attack "succeeds" when the rebuilt input equals the target's update (within Flower's
quantization step); it is "refused" when Flower's mod raises. The same attacks against
fedguard are tests/test_secagg_malicious_server.py and tests/test_secagg_graph_grinding.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import FitRes, ndarrays_to_parameters
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import factor_extract, parameters_mod, parameters_subtraction
from flwr.common.secure_aggregation.ndarrays_arithmetic import parameters_addition
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import (
    pseudo_rand_gen,
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.common.typing import Code, Status
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

NODES = (1, 2, 3, 4, 5)
TARGET = 2
THRESHOLD, SHARE_NUM = 3, 5
CLIP, TARGET_RANGE, MOD_RANGE, MAX_WEIGHT = 1.0, 1 << 16, 1 << 24, 1000.0
SHAPE = (50,)
EXAMPLES = 10


def _update(node: int) -> float:
    return 0.01 * node


class FlowerClient:
    """One client: Flower's secaggplus_mod around a training step adding ``_update(node)`` to every weight."""

    def __init__(self, node: int) -> None:
        self.node = node
        self.context = Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})

    def _train(self, msg: Message, _context: Context) -> Message:
        params = [np.full(SHAPE, _update(self.node), dtype=np.float64)]
        fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(params), EXAMPLES, {})
        return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)

    def ask(self, stage: str, fields: dict) -> dict:
        configs = ConfigRecord({Key.STAGE: stage, **fields})
        msg = Message(RecordDict({RECORD_KEY_CONFIGS: configs}), dst_node_id=self.node, message_type="train")
        reply = secaggplus_mod(msg, self.context, self._train)
        return dict(reply.content[RECORD_KEY_CONFIGS])


def _setup(client: FlowerClient) -> tuple[bytes, bytes]:
    answer = client.ask(Stage.SETUP, {Key.SAMPLE_NUMBER: len(NODES), Key.SHARE_NUMBER: SHARE_NUM,
                                      Key.THRESHOLD: THRESHOLD, Key.CLIPPING_RANGE: CLIP,
                                      Key.TARGET_RANGE: TARGET_RANGE, Key.MOD_RANGE: MOD_RANGE,
                                      Key.MAX_WEIGHT: MAX_WEIGHT})
    return bytes(answer[Key.PUBLIC_KEY_1]), bytes(answer[Key.PUBLIC_KEY_2])


def _fake_keys() -> tuple[bytes, bytes, bytes, bytes]:
    """(sk1, pk1, sk2, pk2) of a key pair the server holds."""
    sk1, pk1 = generate_key_pairs()
    sk2, pk2 = generate_key_pairs()
    return private_key_to_bytes(sk1), public_key_to_bytes(pk1), private_key_to_bytes(sk2), public_key_to_bytes(pk2)


def _unmasked_input(masked: list[np.ndarray], seed: bytes, pairwise: dict[int, bytes]) -> np.ndarray:
    """The target's input from its masked vector, its self-mask seed and its pairwise keys (peer -> key)."""
    dims = [a.shape for a in masked]
    vector = parameters_subtraction(masked, pseudo_rand_gen(seed, MOD_RANGE, dims))
    for peer, key in pairwise.items():  # the target subtracted +mask towards larger ids, added towards smaller
        mask = pseudo_rand_gen(key, MOD_RANGE, dims)
        vector = parameters_subtraction(vector, mask) if TARGET > peer else parameters_addition(vector, mask)
    vector = parameters_mod(vector, MOD_RANGE)
    factor, quantized = factor_extract(vector)
    return dequantize(quantized, CLIP, TARGET_RANGE)[0] / (factor / TARGET_RANGE)


def _is_target_input(values: np.ndarray) -> bool:
    return bool(np.allclose(values, _update(TARGET), atol=4 * CLIP / TARGET_RANGE * MAX_WEIGHT / EXAMPLES))


def _masked_from(answer: dict) -> list[np.ndarray]:
    from flwr.common import bytes_to_ndarray

    return [bytes_to_ndarray(b) for b in answer[Key.MASKED_PARAMETERS]]


def _own_shares(ciphertexts: list[bytes], destinations: list[int], target_pk2: bytes,
                fakes: dict[int, tuple[bytes, bytes, bytes, bytes]]) -> tuple[list[bytes], list[bytes]]:
    seeds, keys = [], []
    for dst, ciphertext in zip(destinations, ciphertexts, strict=True):
        shared = generate_shared_key(bytes_to_private_key(fakes[dst][2]), bytes_to_public_key(target_pk2))
        _src, _dst, seed_share, key_share = share_keys_plaintext_separate(decrypt(shared, ciphertext))
        seeds.append(seed_share)
        keys.append(key_share)
    return seeds, keys


def key_substitution(server_chosen_peers: bool = False) -> dict[str, Any]:
    """Attack 1 (and 5): the target is sent the server's own keys as its neighbours' (or a neighbour set of
    the server's colluders, whose keys the server holds: for Flower's mod the two are the same message)."""
    target = FlowerClient(TARGET)
    pk1, pk2 = _setup(target)
    fakes = {peer: _fake_keys() for peer in NODES if peer != TARGET}
    keys = {str(peer): [fakes[peer][1], fakes[peer][3]] for peer in fakes}
    keys[str(TARGET)] = [pk1, pk2]
    try:
        shared = target.ask(Stage.SHARE_KEYS, keys)
    except ValueError as err:
        return {"result": "refused", "reason": str(err)}
    destinations = [int(d) for d in shared[Key.DESTINATION_LIST]]
    seed_shares, key_shares = _own_shares(list(shared[Key.CIPHERTEXT_LIST]), destinations, pk2, fakes)
    seed = combine_shares(seed_shares[:THRESHOLD])
    # Hand the target shares "from" two fake peers, so it masks (it needs threshold - 1 of them).
    senders = destinations[: THRESHOLD - 1]
    ciphertexts = []
    for src in senders:
        key = generate_shared_key(bytes_to_private_key(fakes[src][2]), bytes_to_public_key(pk2))
        ciphertexts.append(encrypt(key, share_keys_plaintext_concat(src, TARGET, b"\0" * 32, b"\0" * 32)))
    try:
        answer = target.ask(Stage.COLLECT_MASKED_VECTORS, {Key.CIPHERTEXT_LIST: ciphertexts, Key.SOURCE_LIST: senders})
    except ValueError as err:
        return {"result": "refused", "reason": str(err)}
    pairwise = {src: generate_shared_key(bytes_to_private_key(fakes[src][0]), bytes_to_public_key(pk1)) for src in senders}
    rebuilt = _unmasked_input(_masked_from(answer), seed, pairwise)
    del key_shares
    return {"result": "succeeded" if _is_target_input(rebuilt) else "failed", "reason": (
        "the target accepted a neighbour set and keys of the server's choosing" if server_chosen_peers else
        "the target sealed its shares for keys the server holds")}


def _honest_until_masked() -> tuple[dict[int, FlowerClient], dict[int, tuple[bytes, bytes]], dict[int, list[np.ndarray]]]:
    clients = {node: FlowerClient(node) for node in NODES}
    public = {node: _setup(c) for node, c in clients.items()}
    keys = {str(n): [public[n][0], public[n][1]] for n in NODES}
    shares = {node: c.ask(Stage.SHARE_KEYS, dict(keys)) for node, c in clients.items()}
    masked = {}
    for node, client in clients.items():
        inbox = [(src, bytes(ct)) for src, answer in shares.items()
                 for dst, ct in zip(answer[Key.DESTINATION_LIST], answer[Key.CIPHERTEXT_LIST], strict=True)
                 if int(dst) == node]
        answer = client.ask(Stage.COLLECT_MASKED_VECTORS, {Key.CIPHERTEXT_LIST: [c for _, c in inbox],
                                                          Key.SOURCE_LIST: [s for s, _ in inbox]})
        masked[node] = _masked_from(answer)
    return clients, public, masked


def _target_secrets_from(answers: dict[int, dict], public: dict[int, tuple[bytes, bytes]],
                         masked: dict[int, list[np.ndarray]]) -> dict[str, Any]:
    """Rebuild the target's seed and mask key from unmask answers holding both kinds of its shares."""
    seed_shares, key_shares = [], []
    for answer in answers.values():
        listed = [int(n) for n in answer[Key.NODE_ID_LIST]]
        picks = [bytes(s) for n, s in zip(listed, answer[Key.SHARE_LIST], strict=True) if n == TARGET]
        if len(picks) >= 1:
            seed_shares.append(picks[0])
        if len(picks) >= 2:
            key_shares.append(picks[1])
    if len(seed_shares) < THRESHOLD or len(key_shares) < THRESHOLD:
        return {"result": "failed", "reason": f"{len(seed_shares)} seed and {len(key_shares)} key shares"}
    seed, sk1 = combine_shares(seed_shares[:THRESHOLD]), combine_shares(key_shares[:THRESHOLD])
    pairwise = {peer: generate_shared_key(bytes_to_private_key(sk1), bytes_to_public_key(public[peer][0]))
                for peer in NODES if peer != TARGET}
    rebuilt = _unmasked_input(masked[TARGET], seed, pairwise)
    return {"result": "succeeded" if _is_target_input(rebuilt) else "failed"}


def peer_named_both_ways() -> dict[str, Any]:
    """Attack 3: unmask requests naming the target both survived and dropped; each neighbour answers both shares."""
    clients, public, masked = _honest_until_masked()
    answers = {}
    for node in (1, 3, 4):
        active = [TARGET, node, node]  # Flower checks only that the active list is >= threshold long
        answers[node] = clients[node].ask(Stage.UNMASK, {Key.ACTIVE_NODE_ID_LIST: active,
                                                         Key.DEAD_NODE_ID_LIST: [TARGET]})
    outcome = _target_secrets_from(answers, public, masked)
    outcome["reason"] = "neighbours revealed the target's seed share and mask-key share in one answer"
    return outcome


def inconsistent_lists() -> dict[str, Any]:
    """Attack 4: each neighbour is told a different survivor set; the target's seed from some, its neighbours'
    mask keys from others, and no neighbour is asked about the target both ways."""
    clients, public, masked = _honest_until_masked()
    neighbours = [n for n in NODES if n != TARGET]
    answers = {}
    for node in neighbours:
        others = [n for n in neighbours if n != node]
        answers[node] = clients[node].ask(Stage.UNMASK, {Key.ACTIVE_NODE_ID_LIST: [TARGET, node, node],
                                                         Key.DEAD_NODE_ID_LIST: others})
    seed_shares = [bytes(a[Key.SHARE_LIST][0]) for a in answers.values()]
    seed = combine_shares(seed_shares[:THRESHOLD])
    pairwise = {}
    for peer in neighbours:
        shares = []
        for node, answer in answers.items():
            listed = [int(n) for n in answer[Key.NODE_ID_LIST]]
            if node != peer and peer in listed[3:]:
                shares.append(bytes(answer[Key.SHARE_LIST][listed.index(peer, 3)]))
        sk1 = combine_shares(shares[:THRESHOLD])
        pairwise[peer] = generate_shared_key(bytes_to_private_key(sk1), bytes_to_public_key(public[TARGET][0]))
    rebuilt = _unmasked_input(masked[TARGET], seed, pairwise)
    return {"result": "succeeded" if _is_target_input(rebuilt) else "failed",
            "reason": "told as a survivor to its neighbours while each neighbour was named dropped to the others"}


def too_few_shares() -> dict[str, Any]:
    """Attack 2: the target is sent no shares at the masking stage (masked input = input + self-mask only)."""
    target = FlowerClient(TARGET)
    pk1, pk2 = _setup(target)
    fakes = {peer: _fake_keys() for peer in NODES if peer != TARGET}
    keys = {str(peer): [fakes[peer][1], fakes[peer][3]] for peer in fakes}
    keys[str(TARGET)] = [pk1, pk2]
    target.ask(Stage.SHARE_KEYS, keys)
    try:
        target.ask(Stage.COLLECT_MASKED_VECTORS, {Key.CIPHERTEXT_LIST: [], Key.SOURCE_LIST: []})
    except ValueError as err:
        return {"result": "refused", "reason": str(err)}
    return {"result": "not refused"}


ATTACKS = {
    "1 key substitution": key_substitution,
    "2 too few shares (none)": too_few_shares,
    "3 unmask naming a peer both ways": peer_named_both_ways,
    "4 inconsistent survivor lists": inconsistent_lists,
    "5 server-chosen neighbour set": lambda: key_substitution(server_chosen_peers=True),
}
FEDGUARD_RESULTS = {
    "1 key substitution": "refused (tests/test_secagg_malicious_server.py::test_attack1_*)",
    "2 too few shares (none)": "refused (test_attack2_*)",
    "3 unmask naming a peer both ways": "refused (test_attack3_*)",
    "4 inconsistent survivor lists": "refused (test_attack4_inconsistent_survivor_sets_are_refused)",
    "5 server-chosen neighbour set": "refused; grinding the list no better than chance (tests/test_secagg_graph_grinding.py)",
}


def run_secagg_attack_table() -> dict[str, Any]:
    from flwr.supercore.task_identity import TaskIdentity

    rows = []
    saved = {name: getattr(TaskIdentity, name, None) for name in ("_run_id", "_task_id", "_node_id")}
    try:  # messages built outside a running app need the identity Flower sets there
        for name in saved:
            setattr(TaskIdentity, name, 1)
        for name, attack in ATTACKS.items():
            outcome = attack()
            rows.append({"attack": name, "flower_secaggplus_mod": outcome, "fedguard": FEDGUARD_RESULTS[name]})
    finally:
        for name, value in saved.items():
            setattr(TaskIdentity, name, value)
    print("| attack | Flower 1.41 secaggplus_mod | fedguard |\n| --- | --- | --- |")
    for row in rows:
        flower = row["flower_secaggplus_mod"]
        print(f"| {row['attack']} | {flower['result']}: {flower.get('reason', '')} | {row['fedguard']} |")
    return {"nodes": len(NODES), "share_num": SHARE_NUM, "threshold": THRESHOLD, "rows": rows}
