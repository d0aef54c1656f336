"""Flower's own executables (flower-superlink, flower-supernode, flwr), found beside this Python.

They must come from the same environment as fedguard, and they start further Flower
executables (flower-superexec, flwr-serverapp, flwr-clientapp) by bare name, so that
environment's bin directory also goes first on the PATH they inherit: a newcomer running
`.venv/bin/fedguard ...` without activating the venv gets the right tools.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

BIN_DIR = Path(sys.executable).parent


def flower_executable(name: str) -> str:
    beside = BIN_DIR / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found beside {sys.executable} or on PATH; is flwr installed?")
    return found


def environment_with_flower(base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env["PATH"] = os.pathsep.join([str(BIN_DIR), env.get("PATH", "")])
    return env
