"""SecAgg+ stages end to end (no transport): exact sums with dropouts at every stage."""

from __future__ import annotations

import numpy as np
import pytest

from fedguard.privacy.secagg.envelope import ShareAuthenticationError
from fedguard.privacy.secagg.masking import dequantize_sum, levels_for, quantize
from fedguard.privacy.secagg.protocol import ClientSession, SecAggError, SecAggParams, ServerSession, neighbour_graph

BITS, CLIP, LENGTH = 32, 1.0, 300


def _in_cohort(session: ClientSession) -> ClientSession:
    """A session past the cohort stage (these tests hand it its neighbours directly)."""
    session.fix_cohort(b"cohort-digest")
    return session


def _flip_last_byte(ciphertext: bytes) -> bytes:
    return ciphertext[:-1] + bytes([ciphertext[-1] ^ 1])


def _run(
    num_clients, neighbours, threshold, drop_after_keys=(), drop_after_shares=(), drop_after_mask=(), seed=0,
    tampered=(),
):
    """One round; ``tampered`` holds (sender, receiver) pairs whose share ciphertext gets one byte flipped."""
    rng = np.random.default_rng(seed)
    params = SecAggParams(modulus_bits=BITS, neighbours=neighbours, threshold=threshold)
    params.validate(num_clients)
    nodes = [100 + 7 * i for i in range(num_clients)]
    graph = neighbour_graph(nodes, neighbours, seed)
    server = ServerSession(params, server_round=1, graph=graph)
    clients = {node: _in_cohort(ClientSession(node, params, server_round=1)) for node in nodes}
    levels = levels_for(BITS, num_clients)
    updates = {node: rng.uniform(-CLIP, CLIP, LENGTH) for node in nodes}

    advertised = {node: c.advertise() for node, c in clients.items() if node not in drop_after_keys}
    routed = server.route_keys(advertised)
    shares = {node: clients[node].share(keys) for node, keys in routed.items() if node not in drop_after_shares}
    for sender, receiver in tampered:
        shares[sender][receiver] = _flip_last_byte(shares[sender][receiver])
    inbox = server.route_shares(shares)
    masked = {
        node: clients[node].mask(inbox[node], quantize(updates[node], CLIP, levels, rng))
        for node in shares
        if node not in drop_after_mask
    }
    rejected = {node: clients[node].rejected_senders for node in masked}
    survivors, masked_with = server.settle(set(masked), inbox, rejected)
    dropped = set(shares) - survivors
    revealed = {node: clients[node].unmask(survivors, dropped) for node in survivors}
    total, count = server.aggregate({n: masked[n] for n in survivors}, set(shares), revealed, masked_with)
    expected = sum(updates[node] for node in survivors)
    return dequantize_sum(total, count, CLIP, levels), expected, count, 2 * CLIP / levels


@pytest.mark.parametrize(
    ("num_clients", "neighbours", "threshold"), [(3, 2, 2), (5, 4, 3), (8, 4, 3), (10, 6, 4), (12, 11, 6)]
)
def test_sum_is_exact_without_dropouts(num_clients, neighbours, threshold):
    recovered, expected, count, step = _run(num_clients, neighbours, threshold)
    assert count == num_clients
    assert np.max(np.abs(recovered - expected)) <= count * step


@pytest.mark.parametrize("stage", ["keys", "shares", "mask"])
@pytest.mark.parametrize("num_dropped", [1, 2])
def test_dropouts_at_each_stage_are_recovered(stage, num_dropped):
    nodes = [100 + 7 * i for i in range(10)]
    dropped = tuple(nodes[:num_dropped])
    kwargs = {f"drop_after_{stage}": dropped}
    recovered, expected, count, step = _run(10, 6, 4, **kwargs, seed=num_dropped)
    assert count == 10 - num_dropped
    assert np.max(np.abs(recovered - expected)) <= count * step


def test_too_few_survivors_cannot_unmask():
    nodes = [100 + 7 * i for i in range(5)]
    with pytest.raises(SecAggError):
        _run(5, 4, 3, drop_after_mask=tuple(nodes[:3]))


def test_a_client_refuses_to_reveal_both_secrets_of_one_peer():
    params = SecAggParams(BITS, 4, 2)
    client = ClientSession(1, params, 1)
    with pytest.raises(SecAggError, match="before sending"):
        client.unmask({2, 3}, set())
    client._stage = "masked"  # as after sending its masked input
    with pytest.raises(SecAggError, match="both survived and dropped"):
        client.unmask({2, 3}, {3})


def test_a_tampered_share_leaves_its_sender_out_of_the_receivers_masks():
    # 4 clients, so the receiver still holds threshold (2) valid shares after one is tampered.
    params = SecAggParams(BITS, 3, 2)
    nodes = [1, 2, 3, 4]
    server = ServerSession(params, 1, neighbour_graph(nodes, 3, 0))
    clients = {n: _in_cohort(ClientSession(n, params, 1)) for n in nodes}
    routed = server.route_keys({n: c.advertise() for n, c in clients.items()})
    inbox = server.route_shares({n: clients[n].share(routed[n]) for n in nodes})
    sender = min(inbox[1])
    inbox[1][sender] = _flip_last_byte(inbox[1][sender])
    clients[1].mask(inbox[1], np.zeros(4, dtype=np.uint64))
    assert clients[1].rejected_senders == {sender}
    assert sender not in clients[1].neighbours
    with pytest.raises(ShareAuthenticationError):  # the envelope itself still refuses it
        from fedguard.privacy.secagg.envelope import open_sealed
        from fedguard.privacy.secagg.keys import derive_shared_key
        from fedguard.privacy.secagg.protocol import SHARE_PURPOSE

        key = derive_shared_key(clients[1]._envelope_keys.private, routed[1][sender][0], SHARE_PURPOSE)
        open_sealed(key, inbox[1][sender], sender=sender, receiver=1, server_round=1)


@pytest.mark.parametrize("receivers", [1, 2, 6], ids=["one-share", "two-shares", "all-shares"])
def test_a_client_forging_shares_loses_only_its_own_input(receivers):
    """10 clients, 6 neighbours, threshold 4: the forger's input is left out, every other input is summed exactly."""
    nodes = [100 + 7 * i for i in range(10)]
    forger = nodes[0]
    peers = sorted(neighbour_graph(nodes, 6, 4)[forger])
    recovered, expected, count, step = _run(10, 6, 4, seed=4, tampered=[(forger, p) for p in peers[:receivers]])
    assert count == 9
    assert np.max(np.abs(recovered - expected)) <= count * step


def test_forged_shares_leaving_too_few_valid_ones_fail_the_round_naming_the_forger():
    """5 of 6 shares forged: one survivor masked with the forger, but only 1 valid share of its key exists."""
    nodes = [100 + 7 * i for i in range(10)]
    forger = nodes[0]
    peers = sorted(neighbour_graph(nodes, 6, 4)[forger])
    with pytest.raises(SecAggError, match=f"client {forger}: only 1 valid share"):
        _run(10, 6, 4, seed=4, tampered=[(forger, p) for p in peers[:5]])


def test_a_receiver_rejecting_an_honest_share_costs_that_sender_this_round_only():
    """A lying receiver can leave an honest sender out of one sum; the rest is still exact."""
    nodes = [100 + 7 * i for i in range(8)]
    liar = nodes[3]
    victim = sorted(neighbour_graph(nodes, 4, 9)[liar])[0]
    recovered, expected, count, step = _run(8, 4, 3, seed=9, tampered=[(victim, liar)])
    assert count == 7
    assert np.max(np.abs(recovered - expected)) <= count * step


def test_neighbour_graph_is_regular_and_sparse():
    nodes = list(range(100))
    graph = neighbour_graph(nodes, 8, seed=3)
    assert {len(peers) for peers in graph.values()} == {8}
    assert all(node in graph[peer] for node, peers in graph.items() for peer in peers)
    assert neighbour_graph(nodes, 8, seed=3) == graph


def test_impossible_parameters_are_refused():
    with pytest.raises(SecAggError, match="threshold"):
        SecAggParams(BITS, 4, 5).validate(10)
    with pytest.raises(SecAggError, match="threshold"):
        SecAggParams(BITS, 10, 4).validate(3)


def test_client_session_survives_a_round_trip_through_state_between_stages():
    from flwr.app import ConfigRecord, RecordDict

    params = SecAggParams(BITS, 2, 2)
    nodes = [1, 2, 3]
    server = ServerSession(params, 1, neighbour_graph(nodes, 2, 0))
    clients = {n: _in_cohort(ClientSession(n, params, 1)) for n in nodes}

    def reload(node):  # what a ClientApp does between messages: serialize, deserialize
        state = RecordDict({"secagg": ConfigRecord(clients[node].to_dict())})
        restored = RecordDict.inflate(state.deflate(), children=dict(state.children))
        clients[node] = ClientSession.from_dict(restored["secagg"])

    routed = server.route_keys({n: c.advertise() for n, c in clients.items()})
    for n in nodes:
        reload(n)
        assert clients[n].cohort_digest == b"cohort-digest"
    inbox = server.route_shares({n: clients[n].share(routed[n]) for n in nodes})
    for n in nodes:
        reload(n)
    values = {n: np.full(6, n, dtype=np.uint64) for n in nodes}
    masked = {n: clients[n].mask(inbox[n], values[n]) for n in nodes}
    for n in nodes:
        reload(n)
    revealed = {n: clients[n].unmask(set(nodes), set()) for n in nodes}
    total, count = server.aggregate(masked, set(nodes), revealed, {n: clients[n].neighbours for n in nodes})
    assert count == 3 and total.tolist() == [6] * 6


def test_client_refuses_to_encode_non_finite_or_overweight_updates():
    from fedguard.clients.secure_aggregation import encode_weighted_update
    from fedguard.conf import compose_config

    cfg = compose_config(["secure_agg=secaggplus"])
    with pytest.raises(ValueError, match="NaN"):
        encode_weighted_update(np.array([0.1, np.nan]), 10, cfg)
    with pytest.raises(ValueError, match="max_weight"):
        encode_weighted_update(np.array([0.1, 0.2]), cfg.secure_agg.max_weight + 1, cfg)
    encoded = encode_weighted_update(np.array([0.1, -0.2, 9.0]), 10, cfg)
    assert encoded.dtype == np.uint64 and len(encoded) == 4


def test_masking_in_place_gives_the_same_sum_and_copies_otherwise():
    params = SecAggParams(BITS, 2, 2)
    nodes = [1, 2, 3]
    server = ServerSession(params, 1, neighbour_graph(nodes, 2, 0))
    clients = {n: _in_cohort(ClientSession(n, params, 1)) for n in nodes}
    inbox = server.route_shares({n: clients[n].share(keys) for n, keys in server.route_keys(
        {n: c.advertise() for n, c in clients.items()}).items()})
    inputs = {n: np.full(5, n, dtype=np.uint64) for n in nodes}
    kept = inputs[1].copy()
    masked = {1: clients[1].mask(inbox[1], inputs[1])}
    assert np.array_equal(inputs[1], kept)  # default: the caller's input is untouched
    for n in (2, 3):
        masked[n] = clients[n].mask(inbox[n], inputs[n], overwrite_input=True)
        assert masked[n] is inputs[n]
    revealed = {n: clients[n].unmask(set(nodes), set()) for n in nodes}
    total, count = server.aggregate(masked, set(nodes), revealed, {n: clients[n].neighbours for n in nodes})
    assert count == 3 and total.tolist() == [6] * 5


@pytest.mark.parametrize(
    "values",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4)),
        np.arange(7, dtype=np.uint64),
        np.array(3.5),
        np.zeros((0, 3), dtype=np.int64),
    ],
)
def test_array_view_reads_flower_arrays_without_copying(values):
    from flwr.app import Array

    from fedguard.clients.wire.arrays import array_view

    array = Array(values)
    view = array_view(array)
    assert view.dtype == values.dtype and view.shape == values.shape
    assert np.array_equal(view, array.numpy())
    assert not view.flags.writeable  # a view of the message's bytes, never written to


def _cfg(*overrides):
    from fedguard.conf import compose_config

    return compose_config(["secure_agg=secaggplus", *overrides])


def test_held_update_is_stored_compactly_and_encodes_like_the_direct_path():
    from flwr.app import Array, ArrayRecord, Context, RecordDict

    from fedguard.clients.secure_aggregation import (
        ENCODING_STATE_KEY,
        INPUT_ARRAY,
        INPUT_STATE_KEY,
        encode_held_update,
        hold_update,
    )

    cfg = _cfg()
    sa = cfg.secure_agg
    rng = np.random.default_rng(3)
    model = ArrayRecord({"w": Array(rng.standard_normal((30, 20)).astype(np.float32))})
    update = rng.uniform(-0.8, 0.8, 600)  # some entries beyond clip_range
    context = Context(run_id=0, node_id=1, node_config={}, state=RecordDict(), run_config={})
    hold_update(context, update, 40.0, cfg, model)
    held = context.state[INPUT_STATE_KEY][INPUT_ARRAY]
    assert held.dtype == "float32" and len(held.data) < 600 * 8  # half the bytes of float64 / uint64
    assert ENCODING_STATE_KEY in context.state
    levels = levels_for(int(sa.modulus_bits), int(cfg.simulation.num_clients))
    encoded = encode_held_update(context)
    assert encoded.dtype == np.uint64 and len(encoded) == 601
    step = 2 * sa.clip_range * sa.max_weight / levels
    weighted = dequantize_sum(encoded[:-1], 1, sa.clip_range * sa.max_weight, levels)
    held_values = update.astype(np.float32).astype(np.float64)  # what was stored, exactly
    expected = np.clip(held_values, -sa.clip_range, sa.clip_range) * 40.0
    assert np.max(np.abs(held_values - update)) <= 1e-7  # float32 storage: below the model's own precision
    assert np.max(np.abs(weighted - expected)) <= step + 1e-9
    weight_step = 2 * sa.max_weight / levels  # the weight entry is quantized over [-max_weight, max_weight]
    assert dequantize_sum(encoded[-1:], 1, float(sa.max_weight), levels)[0] == pytest.approx(40.0, abs=weight_step)
    with pytest.raises(ValueError, match="NaN"):
        hold_update(context, np.array([np.inf]), 1.0, cfg, model)


class _SlowGrid:
    """Answers each pushed message on the ``answer_after``-th pull (or never)."""

    def __init__(self, answer_after: int | None) -> None:
        self.answer_after, self.pulls, self.pushed = answer_after, 0, []

    def push_messages(self, messages):
        self.pushed = [f"id-{i}" for i, _ in enumerate(messages)]
        return list(self.pushed)

    def pull_messages(self, message_ids):
        from types import SimpleNamespace

        self.pulls += 1
        if self.answer_after is None or self.pulls < self.answer_after:
            return []
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in message_ids]


def test_stage_exchange_polls_at_the_configured_interval_and_honours_the_timeout(monkeypatch):
    import fedguard.server.secure_aggregation as exchange
    sleeps: list[float] = []
    monkeypatch.setattr(exchange.time, "sleep", sleeps.append)
    grid = _SlowGrid(answer_after=4)
    replies = exchange.send_and_collect(grid, [object(), object()], timeout=10.0, poll_interval=0.005)
    assert len(replies) == 2 and grid.pulls == 4 and sleeps == [0.005] * 3

    monkeypatch.setattr(exchange.time, "sleep", lambda seconds: None)
    clock = iter(np.arange(0.0, 100.0, 1.0))
    monkeypatch.setattr(exchange.time, "monotonic", lambda: float(next(clock)))
    silent = _SlowGrid(answer_after=None)
    assert exchange.send_and_collect(silent, [object()], timeout=3.0, poll_interval=0.01) == []
    assert silent.pulls == 3  # gave up once the timeout passed


def test_poll_interval_is_configured_and_checked():
    from fedguard.conf import ConfigError

    assert _cfg().secure_agg.stage_poll_interval == pytest.approx(0.01)
    with pytest.raises(ConfigError, match="stage_poll_interval"):
        _cfg("secure_agg.stage_poll_interval=0")
    with pytest.raises(ConfigError, match="stage_poll_interval"):
        _cfg("secure_agg.stage_timeout=1", "secure_agg.stage_poll_interval=2")


@pytest.mark.parametrize(
    ("neighbours", "clients", "num_shares"), [(4, 10, 5), (4, 100, 5), (5, 100, 7), (6, 100, 7), (4, 5, 5), (8, 5, 5)]
)
def test_flower_comparison_uses_the_nearest_valid_share_count(neighbours, clients, num_shares):
    from fedguard.simulations.bench_secagg_flower import FlowerSecAggSettings

    settings = FlowerSecAggSettings.from_fedguard(neighbours, 3, 120.0, clients)
    assert settings.num_shares == num_shares and settings.reconstruction_threshold == 3
    assert settings.num_shares % 2 == 1 or settings.num_shares == clients
    with pytest.raises(ValueError, match="threshold"):
        FlowerSecAggSettings.from_fedguard(4, 5, 120.0, 10)


def test_masked_inputs_of_the_wrong_form_are_refused_before_summing():
    params = SecAggParams(BITS, 2, 2)
    server = ServerSession(params, 1, neighbour_graph([1, 2, 3], 2, 0))
    good = np.zeros(4, dtype=np.uint64)
    for bad in (np.zeros(5, dtype=np.uint64), np.zeros(4, dtype=np.int64), np.zeros((2, 2), dtype=np.uint64)):
        with pytest.raises(SecAggError, match="uint64 vectors of one length"):
            server.aggregate({1: good, 2: good, 3: bad}, {1, 2, 3}, {}, {})


@pytest.mark.parametrize("corruption", ["garbage", "duplicate-index", "other-secret"])
def test_bad_revealed_shares_are_excluded_when_extra_shares_exist(corruption):
    """A hostile survivor reveals a bad seed share for one peer and a bad key share for a dropped
    one: with more than threshold shares the server rebuilds the secrets from the others (mask
    keys checked against the advertised public key, seeds by two agreeing subsets, so a seed needs
    threshold + 2 shares to outvote one bad share); the sum is exact."""
    num, k, t = 10, 6, 4
    nodes = [100 + 7 * i for i in range(num)]
    params = SecAggParams(BITS, k, t)
    server = ServerSession(params, 1, neighbour_graph(nodes, k, 5))
    clients = {n: _in_cohort(ClientSession(n, params, 1)) for n in nodes}
    routed = server.route_keys({n: c.advertise() for n, c in clients.items()})
    inbox = server.route_shares({n: clients[n].share(routed[n]) for n in nodes})
    dropped_node = nodes[-1]
    values = {n: np.full(5, n, dtype=np.uint64) for n in nodes}
    masked = {n: clients[n].mask(inbox[n], values[n]) for n in nodes if n != dropped_node}
    survivors, masked_with = server.settle(set(masked), inbox, {n: clients[n].rejected_senders for n in masked})
    revealed = {n: clients[n].unmask(survivors, set(nodes) - survivors) for n in survivors}
    liar, victim = next(
        (n, p) for n in sorted(survivors) if dropped_node in revealed[n]
        for p in sorted(revealed[n]) if p != dropped_node and dropped_node not in server.graph[p]
    )  # the victim's 6 neighbours all survive: 6 seed shares, one of them bad
    for target in (victim, dropped_node):
        kind, share = revealed[liar][target]
        if corruption == "garbage":
            bad = share[:3] + bytes(b ^ 0x5A for b in share[3:])
        elif corruption == "duplicate-index":
            other = next(revealed[n][target][1] for n in survivors if n != liar and target in revealed[n])
            bad = other[:2] + share[2:]
        else:
            bad = share[:3] + bytes(len(share) - 3)
        revealed[liar][target] = (kind, bad)
    total, count = server.aggregate({n: masked[n] for n in survivors}, set(nodes), revealed, masked_with)
    assert count == len(survivors) and total.tolist() == [sum(survivors)] * 5


@pytest.mark.parametrize("committed", [True, False], ids=["seed-commitments", "no-commitments"])
def test_a_bad_seed_share_among_threshold_plus_one_is_corrected_by_the_commitment(committed):
    """5 clients, k=4, t=3: a survivor's seed has 4 shares, one of them bad. Checked against its
    signed commitment the seed is rebuilt from the other 3; without one the bad share is
    detected (no 4 shares agree) and the round fails instead of summing a wrong seed."""
    nodes = [1, 2, 3, 4, 5]
    params = SecAggParams(BITS, 4, 3)
    server = ServerSession(params, 1, neighbour_graph(nodes, 4, 0))
    clients = {n: _in_cohort(ClientSession(n, params, 1)) for n in nodes}
    routed = server.route_keys({n: c.advertise() for n, c in clients.items()})
    if committed:
        server.seed_commitments = {n: c.seed_commitment() for n, c in clients.items()}
    inbox = server.route_shares({n: clients[n].share(routed[n]) for n in nodes})
    masked = {n: clients[n].mask(inbox[n], np.full(3, n, dtype=np.uint64)) for n in nodes}
    revealed = {n: clients[n].unmask(set(nodes), set()) for n in nodes}
    kind, share = revealed[2][1]
    revealed[2][1] = (kind, share[:3] + bytes(b ^ 0x33 for b in share[3:]))
    masked_with = {n: clients[n].neighbours for n in nodes}
    if committed:
        total, count = server.aggregate(masked, set(nodes), revealed, masked_with)
        assert count == 5 and total.tolist() == [15] * 3
    else:
        with pytest.raises(SecAggError, match="client 1: no consistent"):
            server.aggregate(masked, set(nodes), revealed, masked_with)
