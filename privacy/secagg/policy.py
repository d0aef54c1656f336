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

from dataclasses import dataclass

from fedguard.privacy.secagg.errors import SecAggError


class PolicyError(SecAggError):
    """The server's SecAgg+ parameters are outside what this site accepts."""


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

    def __post_init__(self) -> None:
        if self.min_threshold < 2:
            raise PolicyError(f"min_threshold={self.min_threshold} must be >= 2")
        if self.max_neighbours is not None and self.max_neighbours < 2:
            raise PolicyError(f"max_neighbours={self.max_neighbours} must be >= 2")
        if self.colluders < 0:
            raise PolicyError(f"colluders={self.colluders} must be >= 0")

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
        if 2 * threshold <= degree + self.colluders:
            raise PolicyError(self._rule_broken(threshold, degree))

    def _rule_broken(self, threshold: int, degree: int) -> str:
        return (
            f"threshold={threshold} with {degree} peers and {self.colluders} assumed colluder(s) breaks "
            f"t > (k + c)/2 = {(degree + self.colluders) / 2}: the server could rebuild both secrets of this site"
        )
