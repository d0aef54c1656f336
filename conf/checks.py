"""The primitive checks every config rule is written with; each error names the key."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from fedguard.conf.schema import ConfigError


def choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(allowed)}")


def in_range(key: str, value: float, low: float | None, high: float | None, *, low_open: bool = False) -> None:
    if value != value:  # NaN passes every comparison below (found by tests/test_fuzz_messages.py)
        raise ConfigError(f"{key}={value!r} is not a number")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and value > high
    if too_low or too_high:
        lower = "" if low is None else f"{'>' if low_open else '>='} {low}"
        upper = "" if high is None else f"<= {high}"
        bounds = " and ".join(b for b in (lower, upper) if b)
        raise ConfigError(f"{key}={value!r} is out of range; it must be {bounds}")


def check_noise_setting(dp: DictConfig, target_key: str, noise_key: str, max_key: str) -> None:
    """Exactly one of a target epsilon (calibrate the noise) and a noise multiplier (fix it);
    zero noise only when asked for explicitly. Shared by sample- and client-level DP."""
    target, noise, ceiling = dp[target_key], dp[noise_key], dp[max_key]
    if (target is None) == (noise is None):
        raise ConfigError(
            f"set exactly one of privacy.{target_key} (calibrate the noise) and privacy.{noise_key} (fix the noise)"
        )
    if target is not None:
        in_range(f"privacy.{target_key}", target, 0.0, None, low_open=True)
    if noise is not None:
        in_range(f"privacy.{noise_key}", noise, 0.0, None)
        if noise == 0 and not dp.allow_zero_noise:
            raise ConfigError(
                f"privacy.{noise_key}=0 gives no privacy at all; set privacy.allow_zero_noise=true "
                "if that is really what you want (e.g. to measure clipping alone)"
            )
    if ceiling is not None:
        in_range(f"privacy.{max_key}", ceiling, 0.0, None, low_open=True)
