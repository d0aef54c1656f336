"""The parameters a user may set under ``strategy.params`` for each of Flower's strategies.

Written out as data so that checking a config needs neither Flower nor the server
package; ``tests/test_architecture.py`` checks this table against the signatures of the
Flower classes ``fedguard.server.strategies`` builds, so it cannot drift. Sampling and
record-key parameters are set by fedguard from other groups and are not listed.
"""

from __future__ import annotations

STRATEGY_PARAMS: dict[str, frozenset[str]] = {
    "fedavg": frozenset(),
    "fedavgm": frozenset({"server_learning_rate", "server_momentum"}),
    "fedprox": frozenset({"proximal_mu"}),
    "fedadam": frozenset({"beta_1", "beta_2", "eta", "eta_l", "tau"}),
    "fedyogi": frozenset({"beta_1", "beta_2", "eta", "eta_l", "tau"}),
    "fedadagrad": frozenset({"eta", "eta_l", "tau"}),
    "fedmedian": frozenset(),
    "fedtrimmedavg": frozenset({"beta"}),
    "krum": frozenset({"num_malicious_nodes"}),
}
