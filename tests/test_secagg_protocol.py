"""SecAgg+ stages end to end (no transport): exact sums with dropouts at every stage."""

from __future__ import annotations

import numpy as np
import pytest

from privacy.secagg.envelope import ShareAuthenticationError
from privacy.secagg.masking import dequantize_sum, levels_for, quantize
from privacy.secagg.protocol import ClientSession, SecAggError, SecAggParams, ServerSession, neighbour_graph

BITS, CLIP, LENGTH = 32, 1.0, 300


def _run(num_clients, neighbours, threshold, drop_after_keys=(), drop_after_shares=(), drop_after_mask=(), seed=0):
    rng = np.random.default_rng(seed)
    params = SecAggParams(modulus_bits=BITS, neighbours=neighbours, threshold=threshold)
    params.validate(num_clients)
    nodes = [100 + 7 * i for i in range(num_clients)]
    graph = neighbour_graph(nodes, neighbours, seed)
    server = ServerSession(params, server_round=1, graph=graph)
    clients = {node: ClientSession(node, params, server_round=1) for node in nodes}
    levels = levels_for(BITS, num_clients)
    updates = {node: rng.uniform(-CLIP, CLIP, LENGTH) for node in nodes}

    advertised = {node: c.advertise() for node, c in clients.items() if node not in drop_after_keys}
    routed = server.route_keys(advertised)
    shares = {node: clients[node].share(keys) for node, keys in routed.items() if node not in drop_after_shares}
    inbox = server.route_shares(shares)
    masked = {
        node: clients[node].mask(inbox[node], quantize(updates[node], CLIP, levels, rng))
        for node in shares
        if node not in drop_after_mask
    }
    survivors = set(masked)
    dropped = set(shares) - survivors
    revealed = {node: clients[node].unmask(survivors & clients[node].neighbours, dropped) for node in survivors}
    total, count = server.aggregate(masked, set(shares), revealed)
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
    recovered, expected, count, step = _run(10, 6, 3, **kwargs, seed=num_dropped)
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
    client._masked_sent = True
    with pytest.raises(SecAggError, match="both survived and dropped"):
        client.unmask({2, 3}, {3})


def test_a_tampered_share_is_rejected_at_the_masking_stage():
    params = SecAggParams(BITS, 2, 2)
    nodes = [1, 2, 3]
    server = ServerSession(params, 1, neighbour_graph(nodes, 2, 0))
    clients = {n: ClientSession(n, params, 1) for n in nodes}
    routed = server.route_keys({n: c.advertise() for n, c in clients.items()})
    inbox = server.route_shares({n: clients[n].share(routed[n]) for n in nodes})
    sender = next(iter(inbox[1]))
    inbox[1][sender] = inbox[1][sender][:-1] + bytes([inbox[1][sender][-1] ^ 1])
    with pytest.raises(ShareAuthenticationError):
        clients[1].mask(inbox[1], np.zeros(4, dtype=np.uint64))


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
    from flwr.app import RecordDict

    params = SecAggParams(BITS, 2, 2)
    nodes = [1, 2, 3]
    server = ServerSession(params, 1, neighbour_graph(nodes, 2, 0))
    clients = {n: ClientSession(n, params, 1) for n in nodes}

    def reload(node):  # what a ClientApp does between messages: serialize, deserialize
        state = RecordDict({"secagg": clients[node].to_record()})
        restored = RecordDict.inflate(state.deflate(), children=dict(state.children))
        clients[node] = ClientSession.from_record(restored["secagg"])

    routed = server.route_keys({n: c.advertise() for n, c in clients.items()})
    for n in nodes:
        reload(n)
    inbox = server.route_shares({n: clients[n].share(routed[n]) for n in nodes})
    for n in nodes:
        reload(n)
    values = {n: np.full(6, n, dtype=np.uint64) for n in nodes}
    masked = {n: clients[n].mask(inbox[n], values[n]) for n in nodes}
    for n in nodes:
        reload(n)
    revealed = {n: clients[n].unmask(set(nodes) & clients[n].neighbours, set()) for n in nodes}
    total, count = server.aggregate(masked, set(nodes), revealed)
    assert count == 3 and total.tolist() == [6] * 6


def test_client_refuses_to_encode_non_finite_or_overweight_updates():
    from clients.secure_aggregation import encode_weighted_update
    from conf import compose_config

    cfg = compose_config(["secure_agg=secaggplus"])
    with pytest.raises(ValueError, match="NaN"):
        encode_weighted_update(np.array([0.1, np.nan]), 10, cfg)
    with pytest.raises(ValueError, match="max_weight"):
        encode_weighted_update(np.array([0.1, 0.2]), cfg.secure_agg.max_weight + 1, cfg)
    encoded = encode_weighted_update(np.array([0.1, -0.2, 9.0]), 10, cfg)
    assert encoded.dtype == np.uint64 and len(encoded) == 4
