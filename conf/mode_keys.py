"""Which config keys each mode actually uses, and the refusal of keys the chosen mode ignores.

Why: the typed schema gives every ``privacy.*`` and ``secure_agg.*`` key a default, so
``fedguard simulate privacy.target_epsilon=3`` composes fine with ``privacy=none`` and
trains with no DP at all. A user who sets a key expects it to act; a key the chosen mode
never reads must be refused, naming the mode that would read it.

Pure functions over plain data (no Hydra, no OmegaConf): callers pass the chosen modes and
the dotted keys the user set (see :func:`keys_from_overrides`).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# Keys (relative to ``privacy.``) each layer reads. ``mode`` is the selector itself.
SAMPLE_DP_KEYS = frozenset({
    "target_epsilon", "noise_multiplier", "max_epsilon", "delta", "max_grad_norm", "accountant",
    "grad_sample_mode", "max_physical_batch_size", "poisson_sampling", "allow_zero_noise",
    "release_unaccounted_metrics", "secure_noise",
})
CLIENT_DP_KEYS = frozenset({
    "client_clip_norm", "client_clipping", "adaptive_clipping", "client_target_epsilon",
    "client_noise_multiplier", "client_max_epsilon", "client_sampling", "noise", "delta", "accountant",
    "allow_zero_noise",
})
PRIVACY_KEYS_BY_MODE: dict[str, frozenset[str]] = {
    "none": frozenset({"mode"}),
    "sample_dp": SAMPLE_DP_KEYS | {"mode"},
    "client_dp": CLIENT_DP_KEYS | {"mode"},
    "sample_and_client_dp": SAMPLE_DP_KEYS | CLIENT_DP_KEYS | {"mode"},
}
# Read only when client-level DP adapts its clip norm (privacy.client_clipping=adaptive).
ADAPTIVE_CLIPPING_KEY = "adaptive_clipping"
SECURE_AGG_KEYS_BY_MODE: dict[str, frozenset[str]] = {
    "off": frozenset({"mode"}),
    "secaggplus": frozenset({
        "mode", "neighbours", "threshold", "clip_range", "modulus_bits", "max_weight", "stage_timeout",
        "stage_poll_interval", "assumed_collusion", "assumed_dropout", "max_run_exposure",
    }),
}
# Override prefixes Hydra accepts in front of a key: force-add, add, delete.
_OVERRIDE_PREFIXES = ("++", "+", "~")


@dataclass(frozen=True)
class ChosenModes:
    """The modes a composed config selected (``privacy.mode``, ``secure_agg.mode``, ``privacy.client_clipping``)."""

    privacy: str
    secure_agg: str
    client_clipping: str = "fixed"


def keys_from_overrides(overrides: Iterable[str]) -> list[str]:
    """Dotted config keys that command-line overrides set, e.g. ``privacy.delta=2`` -> ``privacy.delta``.

    Group choices (``privacy=sample_dp``), deletions (``~key``) and Hydra's own keys
    (``hydra.*``) are not settings of a mode, so they are left out.
    """
    keys: list[str] = []
    for override in overrides:
        if override.startswith("~") or "=" not in override:
            continue
        key = override.split("=", 1)[0]
        for prefix in _OVERRIDE_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        key = key.split("@", 1)[0]  # key@package is a group choice placed elsewhere
        if "." in key and not key.startswith("hydra."):
            keys.append(key)
    return keys


def _mode_suggestions(field: str) -> list[str]:
    """Privacy modes that read ``field``, smallest first (the least a user has to switch on)."""
    modes = [mode for mode, keys in PRIVACY_KEYS_BY_MODE.items() if field in keys]
    return sorted(modes, key=lambda mode: len(PRIVACY_KEYS_BY_MODE[mode]))


def _similar_key(field: str, used: Iterable[str], group: str) -> str | None:
    match = difflib.get_close_matches(field, [k for k in used if k != "mode"], n=1, cutoff=0.75)
    return f"{group}.{match[0]}" if match else None


def _privacy_problem(key: str, modes: ChosenModes) -> str | None:
    field = key.split(".", 2)[1]
    used = PRIVACY_KEYS_BY_MODE.get(modes.privacy)
    if used is None or not any(field in keys for keys in PRIVACY_KEYS_BY_MODE.values()):
        return None  # an unknown mode or key: the schema check names it
    if field in used:
        if field == ADAPTIVE_CLIPPING_KEY and modes.client_clipping != "adaptive":
            return (f"{key} has no effect with privacy.client_clipping={modes.client_clipping}; "
                    f"did you mean privacy.client_clipping=adaptive?")
        return None
    wanted = _mode_suggestions(field)
    # Prefer a mode that keeps everything the user already chose (client_dp -> sample_and_client_dp).
    wanted.sort(key=lambda m: not used <= PRIVACY_KEYS_BY_MODE[m])
    hint = f"privacy={wanted[0]}" + (f" (or {', '.join(wanted[1:])})" if len(wanted) > 1 else "")
    if field == ADAPTIVE_CLIPPING_KEY:
        hint += " with privacy.client_clipping=adaptive"
    similar = _similar_key(field, used, "privacy")
    if similar:
        hint += f", or {similar}"
    return f"{key} has no effect with privacy={modes.privacy}; did you mean {hint}?"


def _secure_agg_problem(key: str, modes: ChosenModes) -> str | None:
    field = key.split(".", 2)[1]
    used = SECURE_AGG_KEYS_BY_MODE.get(modes.secure_agg)
    if used is None or field in used or not any(field in keys for keys in SECURE_AGG_KEYS_BY_MODE.values()):
        return None
    wanted = [m for m, keys in SECURE_AGG_KEYS_BY_MODE.items() if field in keys]
    return f"{key} has no effect with secure_agg={modes.secure_agg}; did you mean secure_agg={wanted[0]}?"


def unused_key_error(modes: ChosenModes, set_keys: Sequence[str]) -> str | None:
    """The refusal for the first key the user set that the chosen modes never read; None if all act.

    ``set_keys`` are dotted keys as the user wrote them (``privacy.adaptive_clipping.learning_rate``).
    Later offending keys are named too, so one run shows every key to fix.
    """
    problems: list[str] = []
    for key in dict.fromkeys(set_keys):  # de-duplicated, order kept
        group = key.split(".", 1)[0]
        if group == "privacy" and "." in key:
            problem = _privacy_problem(key, modes)
        elif group == "secure_agg" and "." in key:
            problem = _secure_agg_problem(key, modes)
        else:
            problem = None
        if problem:
            problems.append(problem)
    if not problems:
        return None
    if len(problems) == 1:
        return problems[0]
    return f"{problems[0]} (also: {'; '.join(problems[1:])})"
