"""Before training: will client-level DP's noise swamp the update it is added to?

Why: DP-FedAvg divides the noised sum of clipped updates by the expected cohort n, so the
noise on the released mean has norm about σ·C·√d/n over d parameters, while the mean clipped
update is at most C long. With a handful of clients (the 5-client default) and any model
beyond a toy, the noise is tens of times longer than the update and the run trains to chance
accuracy without a word. This check says so before anything starts, with the numbers and the
cohort the chosen privacy needs. It lives in server/ because it needs the model (clients/)
and the plan (conf/), and both `fedguard simulate` and `fedguard run` ask it.
"""

from __future__ import annotations

import logging
import math

from fedguard.conf.plans import client_dp_plan, client_level_dp, trains_privately
from fedguard.privacy.accounting import PrivacyConfigError
from fedguard.privacy.client_dp_noise import cohort_for_signal, update_signal
from omegaconf import DictConfig

logger = logging.getLogger(__name__)


def model_parameter_count(cfg: DictConfig) -> int:
    """d: the configured model's parameter count for the dataset's example shape.

    Built on the meta device from the shape the dataset must have (no data is loaded and no
    weights are initialised), so it costs milliseconds even for fashion_mnist's CNN.
    """
    import torch
    from fedguard.clients.datasets import expected_layout
    from fedguard.clients.models import build_model, count_parameters

    input_shape, num_classes = expected_layout(cfg.dataset)
    with torch.device("meta"):
        model = build_model(cfg.model, input_shape, num_classes, private=trains_privately(cfg))
    return count_parameters(model)


def _noise_setting(cfg: DictConfig) -> str:
    dp = cfg.privacy
    if dp.client_noise_multiplier is not None:
        return f"privacy.client_noise_multiplier={dp.client_noise_multiplier:g}"
    return f"privacy.client_target_epsilon={dp.client_target_epsilon:g} over simulation.rounds={cfg.simulation.rounds}"


def swamped_update_warning(cfg: DictConfig) -> str | None:
    """A warning when the noise on the mean update is longer than the update can be, else None.

    Warns when σ_Δ·√d/n > 1 (σ_Δ: the update's noise multiplier, d: parameters, n: expected
    clients per round) and names the clients per round that would bring it to 1 at the same
    privacy setting and sampling rate (see ``cohort_for_signal``).
    """
    if not client_level_dp(cfg):
        return None
    plan = client_dp_plan(cfg)
    parameters = model_parameter_count(cfg)
    try:
        signal = update_signal(plan, parameters)
    except PrivacyConfigError:  # the config checks report an impossible plan in their own words
        return None
    if not signal.swamped:
        return None
    n = signal.expected_cohort
    message = (
        f"client-level DP's noise will swamp the update: noise multiplier {signal.update_sigma:.3g} on the mean of "
        f"{n:g} clients per round over d = {parameters:,} model parameters gives noise of norm about "
        f"{signal.update_sigma:.3g} x sqrt({parameters}) / {n:g} = {signal.noise_to_signal:.3g} x the clip norm, while "
        f"the mean clipped update is at most 1 x the clip norm, so the model will likely stay near chance accuracy"
    )
    needed = cohort_for_signal(plan, parameters)
    if needed is not None:
        rate = plan.cohort.release(1.0).sample_rate
        population = math.ceil(needed / rate)
        message += (
            f"; with {_noise_setting(cfg)} at sampling rate {rate:g} (the noise multiplier stays the same as the "
            f"federation grows) a round needs >= {needed:,} clients, e.g. simulation.num_clients={population} with "
            f"simulation.fraction_train={cfg.simulation.fraction_train:g}; or choose a smaller model, fewer rounds or a "
            f"larger epsilon"
        )
    logger.debug("noise-to-signal %.4g (sigma_update %.4g, n %g, d %d)", signal.noise_to_signal,
                 signal.update_sigma, n, parameters)
    return message
