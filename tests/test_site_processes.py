"""The site's own processes (SuperNode, task launcher, each task) never import from their working directory.

`python -m module` puts the current directory first on sys.path, so whoever can write there (a
shared folder, a run directory) could plant `flwr/` or `fedguard/` and have the site run it with
the site's data at hand. Every process fedguard starts at a site runs Python with -P (3.11+).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
from fedguard.clients import launch
from fedguard.clients.deployment.app_gate import task_command

pytestmark = pytest.mark.deployment  # starts Python subprocesses that import Flower: ~5 s each


def _site_args(tmp_path: Path) -> argparse.Namespace:
    return argparse.Namespace(
        server="127.0.0.1:9092", ca=tmp_path / "ca.crt", key=tmp_path / "node_key", runtime_port=9094, max_wait=30,
        poll_interval=0.25, trusted_publishers=tmp_path / "trusted.yaml", task_launch="fork",
    )


def _commands(tmp_path: Path, monkeypatch) -> dict[str, list[str]]:
    started: list[list[str]] = []
    with monkeypatch.context() as patch:  # subprocess is one module: undo before the test runs anything
        patch.setattr(launch.subprocess, "Popen", lambda argv, **_: started.append(argv))
        launch.start_app_gate(_site_args(tmp_path))
    return {
        "supernode": launch.supernode_command(_site_args(tmp_path), "partition-id=0"),
        "app gate": started[0],
        "task": task_command("127.0.0.1:9094", "token", tmp_path / "trusted.yaml", 1),
    }


def test_every_site_process_leaves_its_working_directory_off_sys_path(tmp_path, monkeypatch):
    shadow = tmp_path / "cwd"
    (shadow / "flwr").mkdir(parents=True)
    marker = tmp_path / "planted-code-ran"
    (shadow / "flwr" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    for name, argv in _commands(tmp_path, monkeypatch).items():
        assert argv[0] == sys.executable, name
        interpreter = argv[: argv.index("-m")]  # the interpreter and its flags, as the site runs them
        subprocess.run([*interpreter, "-c", "import flwr"], cwd=shadow, check=True, timeout=120)
        assert not marker.exists(), f"the {name} process imported code planted in its working directory"


def test_the_check_sees_a_plain_interpreter_import_planted_code(tmp_path):
    """The attack works against `python -m`/`-c` without -P: the test above can fail."""
    (tmp_path / "flwr").mkdir()
    marker = tmp_path / "ran"
    (tmp_path / "flwr" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    subprocess.run([sys.executable, "-c", "import flwr"], cwd=tmp_path, check=True, timeout=60)
    assert marker.exists()
