"""The one error type of the SecAgg+ core, in its own module so every part can raise it."""

from __future__ import annotations


class SecAggError(RuntimeError):
    """The protocol cannot go on (too few survivors, an inconsistent request, a bad share)."""
