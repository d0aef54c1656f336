"""How likely the SecAgg+ graph exposes an honest client, for a given k, t, collusion and dropout rate.

The model (Bell et al. 2020, with the defences of this package in place): a server that
controls a fraction ``collusion`` of the sites learns an honest site's input in a round
only when at least ``t`` of its ``k`` neighbours are its colluders. Fewer are not enough:
every honest neighbour reveals one kind of share for the one survivor set it signed, and
the consistency round makes all of them see the same set, so the colluders must supply
``t`` shares of the kind the honest ones withheld. Neighbours are treated as independent
draws (a binomial tail; for a cohort of n with exactly ``collusion * n`` colluders the
hypergeometric tail is slightly smaller). Dropouts cost availability, not privacy: a site
whose surviving neighbours are fewer than ``t`` cannot be unmasked, and the round fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb


def _tail(trials: int, probability: float, at_least: int) -> float:
    """P(Binomial(trials, probability) >= at_least)."""
    return sum(comb(trials, j) * probability**j * (1 - probability) ** (trials - j)
               for j in range(max(at_least, 0), trials + 1))


@dataclass(frozen=True)
class GraphRisk:
    per_client_round: float  # an honest site exposed in one round
    per_round: float  # some honest site of the cohort exposed in one round
    per_run: float  # some honest site exposed in some round of the run
    round_failure: float  # some site of the cohort left with fewer than t surviving neighbours

    def line(self) -> str:
        return (f"SecAgg+ graph: an honest site is exposed with probability {self.per_client_round:.2g} per round, "
                f"some honest site {self.per_round:.2g} per round and {self.per_run:.2g} over the run; "
                f"rounds fail from dropouts with probability {self.round_failure:.2g}")


def graph_risk(neighbours: int, threshold: int, cohort: int, rounds: int, collusion: float,
               dropout: float = 0.0) -> GraphRisk:
    """Exposure and failure probabilities for degree min(k, cohort - 1) and threshold t."""
    if not 0 <= collusion < 1 or not 0 <= dropout < 1:
        raise ValueError("collusion and dropout are fractions in [0, 1)")
    degree = min(neighbours, cohort - 1)
    exposed = _tail(degree, collusion, threshold)
    honest = max(round(cohort * (1 - collusion)), 1)
    per_round = 1 - (1 - exposed) ** honest
    per_run = 1 - (1 - exposed) ** (honest * rounds)
    stranded = 1 - _tail(degree, 1 - dropout, threshold)  # fewer than t neighbours survive
    failure = 1 - (1 - stranded) ** cohort
    return GraphRisk(exposed, per_round, per_run, failure)
