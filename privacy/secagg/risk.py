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

``graph_risk`` draws neighbours as independent Bernoulli(collusion) trials (the issue's
reference figures); ``listed_risk`` is what the config checks: the worst case of a server
that lists all ceil(collusion x sites) of its colluders in every cohort, the one lever it
keeps once commit-and-reveal stops it from grinding the graph itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil, comb


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


# The stated risk assumptions and bound behind fedguard's SecAgg+ defaults (conf/secure_agg/secaggplus.yaml):
# 5% of sites collude with the server, 5% drop out during a round, and a run in which some honest site
# is exposed with probability above MAX_RUN_EXPOSURE is refused.
DEFAULT_COLLUSION = 0.05
DEFAULT_DROPOUT = 0.05
DEFAULT_MAX_RUN_EXPOSURE = 1e-3
# The most often a round may fail from dropouts (a site left with fewer than t surviving neighbours) in a sized graph.
DEFAULT_MAX_ROUND_FAILURE = 0.05


def colluders_in(population: int, collusion: float) -> int:
    """How many of a federation's ``population`` sites collude at fraction ``collusion`` (rounded up)."""
    return ceil(collusion * population - 1e-9)


def listed_risk(neighbours: int, threshold: int, cohort: int, population: int, rounds: int, collusion: float,
                dropout: float = 0.0) -> GraphRisk:
    """Exposure when the server lists every one of its colluders in every cohort (its remaining lever).

    The graph is a fresh uniform draw the server cannot bias (commit-and-reveal), but the
    server still picks which sites it lists: with C = ceil(collusion x population) colluders
    all listed, an honest site's min(k, cohort - 1) neighbours come from cohort - 1 others of
    which min(C, cohort - 1) collude, so the number of colluding neighbours is hypergeometric.
    Fewer than ``threshold`` colluders in the whole federation expose no one.
    """
    if not 0 <= collusion < 1 or not 0 <= dropout < 1:
        raise ValueError("collusion and dropout are fractions in [0, 1)")
    degree = min(neighbours, cohort - 1)
    others = cohort - 1
    bad = min(colluders_in(population, collusion), others)
    exposed = sum(comb(bad, j) * comb(others - bad, degree - j) for j in range(max(threshold, 0), degree + 1)) / comb(
        others, degree)
    honest = max(cohort - bad, 1)
    per_round = 1 - (1 - exposed) ** honest
    per_run = 1 - (1 - exposed) ** (honest * rounds)
    stranded = 1 - _tail(degree, 1 - dropout, threshold)
    failure = 1 - (1 - stranded) ** cohort
    return GraphRisk(exposed, per_round, per_run, failure)


def candidate_degrees(cohort: int) -> list[int]:
    """Neighbour counts a cohort allows: even k below cohort - 1 (a ring), then the complete graph."""
    return [k for k in range(2, cohort - 1, 2)] + [max(cohort - 1, 1)]


def size_graph(cohort: int, population: int, rounds: int, collusion: float, dropout: float, max_run_exposure: float,
               max_round_failure: float = DEFAULT_MAX_ROUND_FAILURE) -> tuple[int, int] | None:
    """The smallest (k, t) with t > k/2 whose run-wide exposure stays within ``max_run_exposure``
    and whose rounds fail from dropouts at most ``max_round_failure`` of the time; None if none does.

    For each k the smallest t meeting the exposure bound is taken: a larger t only makes
    dropouts fail more rounds. Smaller k first: each site's cost grows with k."""
    for degree in candidate_degrees(cohort):
        for threshold in range(degree // 2 + 1, degree + 1):
            risk = listed_risk(degree, threshold, cohort, population, rounds, collusion, dropout)
            if risk.per_run <= max_run_exposure:
                if risk.round_failure <= max_round_failure:
                    return degree, threshold
                break
    return None
