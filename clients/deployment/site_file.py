"""A site's settings file for ``fedguard client --config site.yaml``, checked as the flags are.

Why a file: a site that runs ``fedguard client`` as a service (systemd, README) keeps its
settings in one reviewed file rather than in a unit's command line. Why no second schema: the
file's keys are the command's own options (``partition-id`` or ``partition_id`` for
``--partition-id``), and every value goes through the same argparse conversion and choices as
the flag, then through the same checks (clients/site.py, the TLS and key files); a flag given
on the command line overrides the file. Relative paths in the file are relative to the file,
so a unit's working directory does not change what the file means.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fedguard.clients.deployment.yaml_file import read_yaml_file


class SiteFileError(ValueError):
    """The site file cannot be used; the message names the file, the key and what is allowed."""


def _options(parser: argparse.ArgumentParser, excluded: set[str]) -> dict[str, argparse.Action]:
    return {action.dest: action for action in parser._actions  # argparse's public-enough registry
            if action.option_strings and action.dest not in excluded and action.dest != "help"}


def _convert(action: argparse.Action, key: str, value: Any, path: Path) -> Any:
    if isinstance(value, (dict, list)) or value is None:
        raise SiteFileError(f"{path}: {key} must be a single value, got {value!r}")
    text = str(value)
    try:
        converted = action.type(text) if action.type is not None else text
    except (TypeError, ValueError):
        kind = {int: "an integer", float: "a number"}.get(action.type, "a value")  # type: ignore[call-overload]
        raise SiteFileError(f"{path}: {key} must be {kind}, got {value!r}") from None
    if isinstance(converted, Path) and not converted.is_absolute():
        converted = (path.parent / converted).resolve()
    if action.choices is not None and converted not in action.choices:
        raise SiteFileError(f"{path}: {key} must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return converted


def site_file_defaults(parser: argparse.ArgumentParser, path: Path, *, excluded: set[str]) -> dict[str, Any]:
    """The file's settings as parser defaults (dest -> converted value)."""
    data = read_yaml_file(path, SiteFileError, "the site file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SiteFileError(f"{path} must be a mapping of settings (key: value)")
    options = _options(parser, excluded)
    allowed = ", ".join(sorted(dest.replace("_", "-") for dest in options))
    defaults = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in options:
            raise SiteFileError(f"{path}: unknown setting {key!r}; allowed: {allowed}")
        action = options[dest]
        if isinstance(action, argparse._AppendAction):  # a repeatable flag (--custom-model): a list in the file
            values = value if isinstance(value, list) else [value]
            defaults[dest] = [_convert(action, str(key), item, path) for item in values]
        else:
            defaults[dest] = _convert(action, str(key), value, path)
    return defaults
