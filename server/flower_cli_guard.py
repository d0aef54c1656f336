"""Refuse a bare ``flwr run`` of this checkout before Flower starts anything heavy.

Why: a Flower user's habit in an app's checkout is ``flwr run .``. Flower 1.41 then takes
the default connection of ``~/.flwr/config.toml`` ("local"), starts a detached
``flower-superlink --simulation`` that outlives the command, and that SuperLink installs
the app's dependencies (torch and the rest: gigabytes) with ``uv sync`` under
``~/.flwr/runtime-envs`` before the ServerApp even loads, only for the ServerApp to refuse
the empty ``fedguard-config`` (``fedguard.conf.run_config.config_from_yaml``).

The one fedguard code Flower's CLI runs before it starts that SuperLink is the import of
this package: validating ``pyproject.toml``'s ``[tool.flwr.app.components]``, it calls
``importlib.util.find_spec("fedguard.server.app")``, which imports ``fedguard.server``
(not ``app``). So the check runs there and only in that process: the ``flwr`` command's
``run``, without a run config that carries ``fedguard-config`` (``fedguard run`` always
passes one). A declared ``[tool.flwr.federations]`` default cannot do this in Flower 1.41:
``flwr run`` migrates that section into ``~/.flwr/config.toml`` and comments it out of the
checkout's pyproject.toml.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from fedguard.clients.wire.protocol import RUN_CONFIG_FEDGUARD

# Exit status of a usage mistake, as fedguard's own commands use it.
USAGE_ERROR = 2
_RUN_CONFIG_OPTIONS = ("-c", "--run-config")

REFUSAL = (
    "fedguard: `flwr run` needs fedguard's config in the run config ({key}), which `fedguard` fills in; "
    "without it Flower would start a local SuperLink in the background and install fedguard's dependencies "
    "(torch: gigabytes) under ~/.flwr, and then the ServerApp would refuse the run. Use `fedguard simulate "
    "[overrides]` for a local simulation, or `fedguard run [overrides]` to submit to a SuperLink "
    "(deployment.superlink); nothing was started."
)


def _run_config_values(argv: Sequence[str]) -> list[str]:
    """The values of ``-c VALUE``, ``--run-config VALUE`` and ``--run-config=VALUE``."""
    values = []
    for index, arg in enumerate(argv):
        if arg in _RUN_CONFIG_OPTIONS and index + 1 < len(argv):
            values.append(argv[index + 1])
        elif arg.startswith("--run-config="):
            values.append(arg.partition("=")[2])
    return values


def _carries_fedguard_config(value: str) -> bool:
    """A ``--run-config`` value: inline ``key=value`` pairs or a TOML file (what ``fedguard run`` passes)."""
    if RUN_CONFIG_FEDGUARD in value:
        return True
    path = Path(value)
    try:
        return path.is_file() and RUN_CONFIG_FEDGUARD in path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def bare_flwr_run(argv: Sequence[str]) -> bool:
    """Whether ``argv`` is Flower's ``flwr run`` of a local app with no fedguard-config in its run config."""
    if len(argv) < 2 or Path(argv[0]).name != "flwr" or argv[1] != "run":
        return False
    positional = [arg for arg in argv[2:] if not arg.startswith("-")]
    if positional and positional[0].startswith("@"):
        return False  # a published app: not this checkout
    return not any(_carries_fedguard_config(value) for value in _run_config_values(argv[2:]))


def refuse_bare_flwr_run(argv: Sequence[str] | None = None) -> None:
    """Exit with a message pointing to ``fedguard simulate`` / ``fedguard run`` if this process is a bare ``flwr run``."""
    argv = sys.argv if argv is None else argv
    if bare_flwr_run(argv):
        print(REFUSAL.format(key=RUN_CONFIG_FEDGUARD), file=sys.stderr, flush=True)
        raise SystemExit(USAGE_ERROR)
