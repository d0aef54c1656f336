"""``fedguard bench secagg-risk``: SecAgg+ exposure and dropout failure vs cohort, collusion and dropouts.

Pure arithmetic over privacy/secagg/risk.py (nothing trains): for each cohort size,
collusion fraction and dropout rate, the (k, t) that ``size_graph`` picks for the stated
bound, its exposure per honest site-round, per round and over the run (the server
listing all its colluders in every cohort, its remaining lever once the graph cannot be
ground), the chance a round fails from dropouts, and the same figures for today's
default k=4, t=3, so an operator sees what the defaults and the bound buy.
"""

from __future__ import annotations

from typing import Any

from fedguard.privacy.secagg.risk import (
    DEFAULT_MAX_ROUND_FAILURE,
    DEFAULT_MAX_RUN_EXPOSURE,
    colluders_in,
    listed_risk,
    size_graph,
)

DEFAULT_COHORTS = (10, 33, 100, 1000)
DEFAULT_COLLUSIONS = (0.01, 0.05, 0.1)
DEFAULT_DROPOUTS = (0.0, 0.05, 0.1)
DEFAULT_ROUNDS = 50
REFERENCE_GRAPH = (4, 3)


def _cell(cohort: int, collusion: float, dropout: float, rounds: int, bound: float) -> dict[str, Any]:
    reference = listed_risk(*REFERENCE_GRAPH, cohort, cohort, rounds, collusion, dropout)
    sized = size_graph(cohort, cohort, rounds, collusion, dropout, bound)
    row: dict[str, Any] = {
        "cohort": cohort, "collusion": collusion, "dropout": dropout, "rounds": rounds,
        "colluders": colluders_in(cohort, collusion),
        "k4_t3": {"per_site_round": reference.per_client_round, "per_round": reference.per_round,
                  "per_run": reference.per_run, "round_failure": reference.round_failure},
        "sized": None,
    }
    if sized is not None:
        risk = listed_risk(*sized, cohort, cohort, rounds, collusion, dropout)
        row["sized"] = {"neighbours": sized[0], "threshold": sized[1], "per_site_round": risk.per_client_round,
                        "per_round": risk.per_round, "per_run": risk.per_run, "round_failure": risk.round_failure}
    return row


def risk_table(rows: list[dict[str, Any]], bound: float) -> str:
    lines = [
        f"SecAgg+ risk, every cohort = the whole federation, server lists all colluders; sized for run exposure <= {bound:g}"
        f" and round failure <= {DEFAULT_MAX_ROUND_FAILURE:g}",
        "| cohort | collusion | dropout | colluders | k=4,t=3 per round | k=4,t=3 over run | k=4,t=3 fails | sized k,t |"
        " sized over run | sized fails |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        ref, sized = row["k4_t3"], row["sized"]
        tail = (f"{sized['neighbours']},{sized['threshold']} | {sized['per_run']:.2g} | {sized['round_failure']:.2g}"
                if sized else "none | - | -")
        lines.append(f"| {row['cohort']} | {row['collusion']:g} | {row['dropout']:g} | {row['colluders']} | "
                     f"{ref['per_round']:.2g} | {ref['per_run']:.2g} | {ref['round_failure']:.2g} | {tail} |")
    return "\n".join(lines)


def run_secagg_risk_benchmark(cohorts=DEFAULT_COHORTS, collusions=DEFAULT_COLLUSIONS, dropouts=DEFAULT_DROPOUTS,
                              rounds: int = DEFAULT_ROUNDS, bound: float = DEFAULT_MAX_RUN_EXPOSURE) -> dict[str, Any]:
    rows = [_cell(n, c, d, rounds, bound) for n in cohorts for c in collusions for d in dropouts]
    print(risk_table(rows, bound))
    return {"bound": bound, "max_round_failure": DEFAULT_MAX_ROUND_FAILURE, "rows": rows}
