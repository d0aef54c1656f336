"""A site's own limits on the SecAgg+ parameters a server may ask it to run with.

Why a site pins these instead of trusting the run's config: the config comes from the
server, the party secure aggregation defends against. A server that announces a low
threshold, or gives a site more neighbours than the threshold covers, can collect both
the self-mask seed share and the mask-key share of the same site from different
neighbours (Bell et al. 2020, active model). Each honest neighbour reveals one kind of
share per peer; with ``c`` colluding neighbours revealing both kinds, the server gets
``t`` shares of both kinds only if ``2t <= k + c``. So a site requires ``2t > k + c``
for the neighbour count ``k`` it is really given, and a floor on ``t`` and a ceiling on
``k`` of its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from fedguard.privacy.secagg.errors import SecAggError


class PolicyError(SecAggError):
    """The server's SecAgg+ parameters are outside what this site accepts."""


# The share of roster sites a site assumes may collude with the server unless it pins a count
# (the server-side risk check's ``secure_agg.assumed_collusion`` default, so both sides agree).
DEFAULT_COLLUSION_FRACTION = 0.05
# Sessions a site reveals its graph nonce in, then sees abandoned before it masks, per run:
# each such abort shows the server one more random graph it could have kept or thrown away.
DEFAULT_MAX_UNFINISHED_REVEALS = 3
# Honest sites besides this one that a cohort must have room for (see ``min_cohort_for``).
HONEST_PEERS_IN_COHORT = 1


def colluders_for(fraction: float, roster_size: int) -> int:
    """ceil(fraction x roster size): the colluders a site assumes among the sites it knows of.

    Computed on the decimal value (``Fraction(repr(...))``) so that 0.05 x 60 is 3, not the
    float product's 3.0000000000000004 rounded up to 4.
    """
    if not 0 <= fraction < 1:
        raise PolicyError(f"collusion fraction {fraction} must be in [0, 1)")
    if roster_size < 0:
        raise PolicyError(f"roster size {roster_size} must be >= 0")
    return math.ceil(Fraction(repr(float(fraction))) * roster_size)


def min_cohort_for(colluders: int, roster_size: int) -> int:
    """The fewest sites a cohort list may hold by default: every assumed colluder, this site and
    one honest other (c + 2), capped at the roster size.

    Why: a server that lists all ``c`` colluders needs at least one more honest site for any
    sum to hold this site's input together with an honest input. Within a cohort that passes
    the share stage the threshold rule (t > c, and t peers) already implies this; the minimum
    refuses such a list at the cohort stage, before the nonce is revealed, and a site pins a
    larger one (``secagg-min-cohort``) to demand a crowd to hide in.
    """
    return min(roster_size, colluders + 1 + HONEST_PEERS_IN_COHORT)


@dataclass(frozen=True)
class SitePolicy:
    """``min_threshold``: the fewest shares that may rebuild this site's secrets.
    ``max_neighbours``: the most peers this site shares its secrets among (None: no cap
    beyond the threshold rule). ``colluders``: how many of its neighbours the site assumes
    may collude with the server. ``min_cohort``: the fewest sites in a round's cohort list."""

    min_threshold: int = 2
    max_neighbours: int | None = None
    colluders: int = 0
    # The fewest sites a round's cohort list may hold: the neighbour graph is hashed from the
    # list, so a server showing a site a small hand-picked cohort could still choose its peers.
    min_cohort: int = 0
    # Sessions per run this site revealed its graph nonce in that never reached its masked input.
    max_unfinished_reveals: int = DEFAULT_MAX_UNFINISHED_REVEALS

    def __post_init__(self) -> None:
        if self.min_threshold < 2:
            raise PolicyError(f"min_threshold={self.min_threshold} must be >= 2")
        if self.max_neighbours is not None and self.max_neighbours < 2:
            raise PolicyError(f"max_neighbours={self.max_neighbours} must be >= 2")
        if self.colluders < 0:
            raise PolicyError(f"colluders={self.colluders} must be >= 0")
        if self.min_cohort < 0:
            raise PolicyError(f"min_cohort={self.min_cohort} must be >= 0")
        if self.max_unfinished_reveals < 0:
            raise PolicyError(f"max_unfinished_reveals={self.max_unfinished_reveals} must be >= 0")

    def _check_threshold_beats_colluders(self, threshold: int) -> None:
        """t > c: the colluders alone never hold ``threshold`` shares of this site's secrets, and
        the ``threshold`` neighbour signatures it needs on a survivor set before unmasking
        include an honest survivor besides itself (so no sum holds its input among colluders only)."""
        if threshold <= self.colluders:
            raise PolicyError(
                f"the server's threshold={threshold} does not exceed the {self.colluders} colluder(s) this site "
                f"assumes (secagg-colluders, or secagg-collusion-fraction x its roster): colluders alone could "
                f"rebuild its secrets from a cohort of this site and {threshold} of them"
            )

    def check_announced(self, neighbours: int, threshold: int, cohort: int) -> None:
        """Refuse a round whose announced k (``neighbours``) and t this site does not allow,
        with ``cohort`` the clients per round the config plans (degree min(k, cohort - 1))."""
        if threshold < self.min_threshold:
            raise PolicyError(
                f"the server's threshold={threshold} is below this site's minimum {self.min_threshold}"
            )
        if self.max_neighbours is not None and neighbours > self.max_neighbours:
            raise PolicyError(
                f"the server's neighbours={neighbours} exceeds this site's maximum {self.max_neighbours}"
            )
        self._check_threshold_beats_colluders(threshold)
        if cohort < self.min_cohort:  # before training: the cohort stage would refuse it anyway
            raise PolicyError(f"the run plans {cohort} sites a round, fewer than this site's minimum cohort {self.min_cohort}")
        degree = min(neighbours, max(cohort - 1, 1))
        if 2 * threshold <= degree + self.colluders:
            raise PolicyError(self._rule_broken(threshold, degree))

    def check_cohort(self, cohort: int) -> None:
        if cohort < self.min_cohort:
            raise PolicyError(f"the server's cohort list holds {cohort} sites, fewer than this site's minimum {self.min_cohort}")

    def check_degree(self, degree: int, neighbours: int, threshold: int) -> None:
        """Refuse to share secrets among ``degree`` peers (what the server really sent) unless
        ``degree`` <= the announced k and 2t > degree + colluders."""
        if degree > neighbours:
            raise PolicyError(f"given {degree} peers, more than the announced neighbours={neighbours}")
        if self.max_neighbours is not None and degree > self.max_neighbours:
            raise PolicyError(f"given {degree} peers, more than this site's maximum {self.max_neighbours}")
        self._check_threshold_beats_colluders(threshold)
        if 2 * threshold <= degree + self.colluders:
            raise PolicyError(self._rule_broken(threshold, degree))

    def _rule_broken(self, threshold: int, degree: int) -> str:
        return (
            f"threshold={threshold} with {degree} peers and {self.colluders} assumed colluder(s) breaks "
            f"t > (k + c)/2 = {(degree + self.colluders) / 2}: the server could rebuild both secrets of this site"
        )
