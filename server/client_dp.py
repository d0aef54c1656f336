"""Server side of client-level DP (DP-FedAvg) as a wrapper around any sum-based strategy.

Per round the wrapper (1) draws the cohort with the sampler the accountant assumes
(Poisson: every available client independently with rate q; fixed: a uniform sample of
Flower's cohort size without replacement; both from OS randomness), (2) checks that every update it can see has L2
norm <= C, (3) adds N(0, (σC)²) to the *sum* of clipped updates and divides by the
expected cohort size (qN for Poisson, so the cohort's real size, which depends on who
joined, is never divided by), (4) writes the round's ``ClientDpRelease`` to the ledger
and only then (5) hands the inner strategy one reply holding global + noised mean, so
FedAvg takes it as is and FedAdam & co. apply their server step to it (post-processing).
With ``privacy.noise=distributed`` step (3) adds nothing: the clients' noise shares are
already in the SecAgg+ sum, and the accountant records σ·√(survivors/n), the noise that
survived dropouts, never the planned σ.

Adaptive clipping (``privacy.client_clipping=adaptive``, privacy/adaptive_clipping.py):
configure_train sends the current C with the train config; aggregate_train sums the
clients' centred clip indicators (each plain reply's ``clip-indicator``, or the one sum
SecAgg+ unmasked), adds N(0, σ_b²) when noise is central, and moves C for the next round.
The update noise is then σ_Δ·C, and the accountant records the combined σ
(privacy/client_dp_accounting.py); C is part of the checkpointed state.

Why uniform weights: see clients/client_dp.py. The wrapper ignores ``num-examples``
of plain replies altogether; under SecAgg+ clients send weight 1, so the aggregate's
total weight is the number of survivors.

Noise comes from the OS's entropy (``secrets``), never from the run's seed: noise anyone
can regenerate protects nothing. Cohorts are drawn the same way, for the same reason.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from fedguard.clients.wire import protocol
from fedguard.clients.wire.arrays import array_view, flatten_update
from fedguard.conf.plans import adaptive_clip_rule, client_dp_plan, uses_adaptive_clipping
from fedguard.privacy.adaptive_clipping import INDICATOR_OFFSET, AdaptiveClipState
from fedguard.privacy.client_dp_accounting import (
    POISSON,
    SERVER_OPERATOR,
    ClientDpPlan,
    FederationAccountant,
    Release,
    build_accountant,
    epsilon_by_observer,
    planned_epsilon,
)
from fedguard.privacy.client_dp_noise import NoiseSplit, count_noise_std, worst_case_surviving_fraction
from fedguard.privacy.ledger_events import ClientDpRelease
from fedguard.server.client_dp_arrays import add_central_noise, unflatten_onto  # noqa: F401 (tests import it here)
from fedguard.server.client_pool import ExcludingGrid
from fedguard.server.cohorts import CohortSampler, cohort_sampler
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from omegaconf import DictConfig

logger = logging.getLogger(__name__)

# A plain update may exceed C by float round-off of the norm's summation order only
# (the client mod already makes the stored update's norm <= C).
CLIP_CHECK_RTOL = 1e-9
ReleaseCallback = Callable[[ClientDpRelease], None]
# Destination of the stand-in train message an empty cohort's release replies to (no real node).
EMPTY_COHORT_NODE = 0
# Key of the current clip norm in the checkpointed client-level DP state (adaptive clipping).
CLIP_NORM_STATE_KEY = "clip_norm"


@dataclass
class RoundPlan:
    """What configure_train decided, for aggregate_train and the accountant."""

    global_arrays: ArrayRecord
    population: int
    cohort: int
    instructions: dict[int, Message]
    clip_norm: float  # C of this round (adaptive clipping moves it after aggregation)


class ClientDpStrategy(Strategy):
    """DP-FedAvg around ``inner``; see the module docstring."""

    def __init__(
        self,
        inner: Strategy,
        plan: ClientDpPlan,
        accountant: FederationAccountant,
        *,
        distributed_noise: bool,
        secure_aggregation: bool,
        max_epsilon: float | None = None,
        adaptive: AdaptiveClipState | None = None,
        on_release: ReleaseCallback | None = None,
    ) -> None:
        """``plan``: the run's client-level DP parameters (plain numbers, conf.plans builds
        them); ``adaptive``: adaptive clipping's state (None: clip to the plan's fixed C)."""
        self.inner = inner
        self.dp_plan = plan
        self.accountant = accountant
        self.secure_aggregation = secure_aggregation
        self.on_release = on_release
        self.fixed_clip_norm = plan.clip_norm
        self.adaptive = adaptive
        self.split = NoiseSplit.of(accountant.noise_multiplier, count_noise_std(plan))  # planned σ, σ_Δ, σ_b
        self.max_epsilon = max_epsilon
        self.distributed = distributed_noise
        self.min_available_nodes = int(getattr(inner, "min_available_nodes", 1))
        self.rng = np.random.default_rng(secrets.randbits(128))
        # Fixed cohorts have Flower's size: fraction of the available nodes, at least min_train_nodes.
        self.cohorts: CohortSampler = cohort_sampler(
            plan.cohort.sampling, plan.cohort.rate, int(getattr(inner, "min_train_nodes", 0))
        )
        self.plan: RoundPlan | None = None
        self.last_release: dict[str, Any] | None = None
        # The wrapper picks the cohort (server/cohorts.py, OS randomness); the inner strategy
        # then takes exactly the nodes it is shown.
        inner.fraction_train, inner.min_train_nodes, inner.min_available_nodes = 1.0, 0, 0

    @property
    def sampling(self) -> str:
        return self.cohorts.sampling

    @property
    def rate(self) -> float:
        return self.dp_plan.cohort.rate

    @property
    def releases_without_replies(self) -> bool:
        """An empty Poisson cohort still gets its release: noise only, accounted like any round.

        DP-FedAvg's guarantee covers the round whoever was drawn; skipping (or stopping at)
        empty rounds would change the mechanism the accountant assumes. Under SecAgg+ there
        is no aggregate to carry the release, and fixed-size cohorts are never empty.
        """
        return self.sampling == POISSON and not self.secure_aggregation

    @property
    def noise_multiplier(self) -> float:
        return self.accountant.noise_multiplier

    @property
    def clip_norm(self) -> float:
        """C of the next round."""
        return self.adaptive.clip_norm if self.adaptive is not None else self.fixed_clip_norm

    @property
    def clipping(self) -> str:
        return "adaptive" if self.adaptive is not None else "fixed"

    def state_payload(self) -> dict[str, Any]:
        """What a checkpoint carries: the accountant's history, and C under adaptive clipping."""
        payload = self.accountant.to_payload()
        if self.adaptive is not None:
            payload[CLIP_NORM_STATE_KEY] = self.adaptive.clip_norm
        return payload

    def worst_case_sigma(self, population: int) -> float:
        """σ the next release holds at the least noise the protocol allows: the planned σ under
        central noise; under distributed noise what SecAgg+'s threshold of survivors leave
        (fewer survivors fail the round, so nothing is released)."""
        if not self.distributed:
            return self.split.sigma
        return self.split.surviving(worst_case_surviving_fraction(self.dp_plan, population)).sigma

    def stop_reason(self, server_round: int, grid: Grid) -> str | None:
        """Why round ``server_round`` must not run (it could exceed client_max_epsilon), or None.

        Checked at the worst case the protocol allows, not the planned σ: dropouts happen after
        the decision, and the stop must hold whatever the survivors."""
        if self.max_epsilon is None:
            return None
        population = len(list(grid.get_node_ids()))
        if population == 0:
            return None
        sigma = self.worst_case_sigma(population)
        after = self.accountant.epsilon_if(self.dp_plan.cohort.release(sigma, population))
        if after > self.max_epsilon:
            worst = " with the fewest survivors SecAgg+ allows" if self.distributed else ""
            return (
                f"round {server_round} could take the federation's client-level epsilon to {after:.4g}{worst}, over "
                f"privacy.client_max_epsilon={self.max_epsilon} (spent so far: {self.accountant.epsilon:.4g})"
            )
        return None

    def effective_noise(self, survivors: int) -> NoiseSplit:
        """(σ, σ_Δ, σ_b) of the noise really in the released sums.

        Central: the server's N(0, (σ_Δ·C)²) and N(0, σ_b²). Distributed: each survivor added
        N(0, σ_Δ²C²/n) and N(0, σ_b²/n) with n the planned cohort the clients sized their
        shares for, so the sums hold s/n of those variances: dropouts (s < n) leave less
        noise, and the accountant must see that (σ recombined from what survived).
        """
        if not self.distributed:
            return self.split
        return self.split.surviving(survivors / self.dp_plan.cohort.expected_size())

    def account_recorded(self, bodies: list[dict[str, Any]]) -> None:
        """Count releases the ledger holds but the checkpoint's accountant does not (the server
        crashed between the two): they may have been seen, so they are spent."""
        for body in bodies:
            population = int(body.get("population") or body["cohort_size"])
            sigma, rate = float(body["noise_multiplier"]), float(body["sample_rate"])
            self.accountant.record(Release(sigma, rate, population, int(body["cohort_size"])))
            logger.warning("round %s's release was recorded but not checkpointed; counted as spent", body["round"])

    # -- training ---------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        population = list(grid.get_node_ids())
        view = ExcludingGrid(grid)
        cohort = self.cohorts.draw(population)
        for node in population:
            if node not in cohort:
                view.exclude(node, f"not in this round's {self.sampling} cohort")
        if self.adaptive is not None:  # clients clip to the server's C (and check it); see clients/client_dp.py
            config[protocol.CLIENT_CLIP_NORM_KEY] = self.clip_norm
        # The accountant records the (cohort, population) really drawn.
        messages = list(self.inner.configure_train(server_round, arrays, config, view))
        instructions = {m.metadata.dst_node_id: m for m in messages}
        self.plan = RoundPlan(arrays, len(population), len(messages), instructions, self.clip_norm)
        logger.info("round %d: client-level DP cohort %d of %d (%s)", server_round, len(messages), len(population), self.sampling)
        return messages

    def _plain_sum(
        self, server_round: int, replies: Iterable[Message], plan: RoundPlan
    ) -> tuple[np.ndarray, list[Message], float]:
        """Sum of the plain updates whose norm is within the round's C, and of their clip
        indicators (adaptive clipping); other replies are rejected (and logged)."""
        total, accepted, indicators = None, [], 0.0
        limit = plan.clip_norm * (1 + CLIP_CHECK_RTOL)
        for reply in replies:
            update = flatten_update(reply.content[protocol.ARRAYS_KEY], plan.global_arrays)
            norm = float(np.linalg.norm(update))
            problem = None
            if not np.isfinite(norm) or norm > limit:
                problem = f"norm {norm:.6g} exceeds the round's clip norm {plan.clip_norm:g}"
            elif self.adaptive is not None and protocol.CLIP_INDICATOR_KEY not in reply.content:
                problem = "it carries no clip indicator, which adaptive clipping needs"
            if problem is not None:
                node = reply.metadata.src_node_id
                logger.warning("round %d: rejected the update of client node %d: %s", server_round, node, problem)
                continue
            if self.adaptive is not None:
                indicators += float(reply.content[protocol.CLIP_INDICATOR_KEY][protocol.CLIP_INDICATOR_FIELD])
            total = update if total is None else total + update
            accepted.append(reply)
        if total is None:
            total = np.zeros(sum(array_view(plan.global_arrays[key]).size for key in plan.global_arrays.keys()))
        return total, accepted, indicators

    def _secure_sum(self, replies: list[Message], base: ArrayRecord) -> tuple[np.ndarray, int, float]:
        """The SecAgg+ aggregate reply holds global + sum / survivors (weights are 1) and, under
        adaptive clipping, the sum of the (noised) clip indicators."""
        if len(replies) != 1:
            raise ValueError(f"secure aggregation hands over one aggregate reply, not {len(replies)}")
        content = replies[0].content
        survivors = int(round(float(content[protocol.METRICS_KEY][protocol.NUM_EXAMPLES_KEY])))
        indicators = 0.0
        if self.adaptive is not None:
            if protocol.CLIP_INDICATOR_KEY not in content:
                raise ValueError("the secure aggregate lacks the sum of clip indicators that adaptive clipping needs")
            indicators = float(content[protocol.CLIP_INDICATOR_KEY][protocol.CLIP_INDICATOR_FIELD])
        return flatten_update(content[protocol.ARRAYS_KEY], base) * survivors, survivors, indicators

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        plan = self.plan
        if plan is None:
            raise RuntimeError("aggregate_train before configure_train")
        if self.secure_aggregation:
            total, survivors, indicators = self._secure_sum(replies, plan.global_arrays)
            losses = [float(replies[0].content[protocol.METRICS_KEY][protocol.TRAIN_LOSS_KEY])]
        else:
            total, accepted, indicators = self._plain_sum(server_round, replies, plan)
            survivors = len(accepted)
            losses = [float(r.content[protocol.METRICS_KEY][protocol.TRAIN_LOSS_KEY]) for r in accepted]
        noise = self.effective_noise(survivors)
        std = noise.update_sigma * plan.clip_norm  # of the released update sum
        denominator = self.cohorts.denominator(plan.cohort, plan.population)
        central_std = 0.0 if self.distributed else std
        mean_update = add_central_noise(total, central_std, self.rng) / denominator
        noisy_count = None
        if self.adaptive is not None:  # the noised sum of centred clip indicators: part of this release
            count_std = 0.0 if self.distributed else float(self.split.count_std)
            noisy_count = float(add_central_noise(np.array([indicators]), count_std, self.rng)[0])
        rate = self.cohorts.sample_rate(plan.cohort, plan.population)
        release = Release(noise.sigma, rate, plan.population, plan.cohort)
        epsilon = self.accountant.record(release)
        event = ClientDpRelease(
            round=server_round, clip_norm=plan.clip_norm, noise_std=std, noise_multiplier=noise.sigma,
            sampling=self.sampling, sample_rate=rate, cohort_size=plan.cohort, survivors=min(survivors, plan.cohort),
            delta=self.accountant.delta, accountant="rdp", epsilon=epsilon, population=plan.population,
            clipping=self.clipping, update_noise_multiplier=noise.update_sigma, count_noise_std=noise.count_std,
            epsilon_server_operator=epsilon_by_observer(self.accountant, distributed_noise=self.distributed)[SERVER_OPERATOR],
            noise="distributed" if self.distributed else "central", expected_cohort=self.dp_plan.cohort.expected_size(),
            planned_update_noise_multiplier=self.split.update_sigma, planned_count_noise_std=self.split.count_std,
        )
        if self.on_release is not None:
            self.on_release(event)  # on the record before the release leaves this method
        self.last_release = {
            "clip_norm": plan.clip_norm, "noise_std": std, "noise_multiplier": noise.sigma, "noise": "distributed" if self.distributed else "central",
            "cohort_size": plan.cohort, "survivors": survivors, "expected_cohort": denominator,
            "sample_rate": rate, "population": plan.population, "epsilon": epsilon, "clipping": self.clipping,
            "update_noise_multiplier": noise.update_sigma, "count_noise_std": noise.count_std,
        }
        if self.adaptive is not None and noisy_count is not None:
            fraction = self.adaptive.update(noisy_count, denominator)
            self.last_release.update(
                unclipped_count=noisy_count + INDICATOR_OFFSET * denominator,  # noisy estimate of the clients within C
                unclipped_fraction=fraction, next_clip_norm=self.adaptive.clip_norm,
            )
        loss = sum(losses) / len(losses) if losses else float("nan")
        content = RecordDict(
            {
                protocol.ARRAYS_KEY: unflatten_onto(plan.global_arrays, mean_update),
                protocol.METRICS_KEY: MetricRecord({protocol.NUM_EXAMPLES_KEY: 1, protocol.TRAIN_LOSS_KEY: loss}),
            }
        )
        # Shaped as the reply to one train message; an empty cohort has none, so a stand-in.
        anchor = plan.instructions[min(plan.instructions)] if plan.instructions else Message(
            RecordDict(), dst_node_id=EMPTY_COHORT_NODE, message_type=MessageType.TRAIN
        )
        self.plan = None
        return self.inner.aggregate_train(server_round, [Message(content, reply_to=anchor)])

    # -- evaluation and summary pass through --------------------------------------------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.inner.summary()

    def federation_summary(self) -> dict[str, Any]:
        """summary.json's ``privacy.federation`` (rounds: releases accounted, across resumes)."""
        last = self.accountant.releases[-1] if self.accountant.releases else None
        return {
            "epsilon": self.accountant.epsilon,
            "delta": self.accountant.delta,
            "accountant": "rdp" if self.sampling == POISSON else "rdp (dp_accounting, sampling without replacement)",
            "sampling": self.sampling,
            "sample_rate": last.sample_rate if last else self.rate,
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": self.clip_norm,  # adaptive clipping: where C ended (the next round's)
            "clipping": self.clipping,
            "rounds": len(self.accountant.releases),
            "budget_epsilon": self.max_epsilon,
            # "epsilon" above holds only against those who cannot tell who was sampled (README).
            "epsilon_by_observer": epsilon_by_observer(self.accountant, distributed_noise=self.distributed),
            **(self._adaptive_summary() if self.adaptive is not None else {}),
        }

    def _adaptive_summary(self) -> dict[str, Any]:
        assert self.adaptive is not None
        return {
            "initial_clip_norm": self.fixed_clip_norm,
            "target_quantile": self.adaptive.target_quantile,
            "learning_rate": self.adaptive.learning_rate,
            "update_noise_multiplier": self.split.update_sigma,  # planned σ_Δ (σ above is the combined one)
            "count_noise_std": self.split.count_std,  # planned σ_b
        }


def wrap_for_client_dp(cfg: DictConfig, strategy: Strategy, saved: dict[str, Any] | None) -> ClientDpStrategy:
    """The DP-FedAvg layer for a run: a resumed run continues its saved accounting, a new one
    calibrates (or takes) σ and prints the epsilon the planned run will spend."""
    plan = client_dp_plan(cfg)
    clip_norm = None
    if saved is not None:
        accountant = FederationAccountant.from_payload(saved)
        clip_norm = saved.get(CLIP_NORM_STATE_KEY)  # adaptive clipping continues from the saved C
        logger.warning(
            "client-level DP resumed: sigma %.4g, epsilon so far %.4g after %d releases%s",
            accountant.noise_multiplier, accountant.epsilon, len(accountant.releases),
            "" if clip_norm is None else f", clip norm {clip_norm:.4g}",
        )
    else:
        accountant = build_accountant(plan)
        logger.warning(
            "client-level DP: clip norm %g, noise multiplier %.4g, %s sampling at rate %g: %d rounds spend "
            "epsilon %.4g at delta %g (client level)",
            cfg.privacy.client_clip_norm, accountant.noise_multiplier, accountant.sampling,
            cfg.simulation.fraction_train, cfg.simulation.rounds,
            planned_epsilon(plan, accountant.noise_multiplier), accountant.delta,
        )
    # Adaptive clipping: C starts at client_clip_norm, or where a checkpoint left it.
    adaptive = AdaptiveClipState.start(adaptive_clip_rule(cfg), clip_norm) if uses_adaptive_clipping(cfg) else None
    wrapper = ClientDpStrategy(
        strategy, plan, accountant, distributed_noise=cfg.privacy.noise == "distributed",
        secure_aggregation=cfg.secure_agg.mode != "off", max_epsilon=cfg.privacy.client_max_epsilon, adaptive=adaptive,
    )
    if wrapper.adaptive is not None and saved is None:
        logger.warning(
            "adaptive clipping (target quantile %g, learning rate %g): sigma %.4g is split into %.4g on the update "
            "and std %.4g on the clip count (sigma^-2 = sigma_update^-2 + (2 sigma_b)^-2)",
            wrapper.adaptive.target_quantile, wrapper.adaptive.learning_rate, wrapper.split.sigma,
            wrapper.split.update_sigma, wrapper.split.count_std,
        )
    return wrapper
