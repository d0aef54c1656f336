"""The site's task launcher forks each task from a warm process (clients/deployment/app_gate.py).

The signature check itself runs inside every task process and is attacked end to end by
tests/test_app_signing.py and tests/test_deployment.py (unsigned and modified runs refused by
sites whose launcher forks); these tests check the launcher's own parts.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time

import pytest

from fedguard.clients.deployment.app_gate import WARM_MODULES, Tasks, warm_up


def test_warm_up_leaves_a_module_that_fails_to_its_task(caplog):
    with caplog.at_level(logging.WARNING, logger="fedguard.site"):
        warm_up(("json", "fedguard_no_such_module_for_this_test"))
    assert "could not import fedguard_no_such_module_for_this_test ahead of tasks" in caplog.text


def test_stopping_the_launcher_stops_and_reaps_its_task_processes():
    tasks = Tasks()
    pid = os.fork()
    if pid == 0:  # a task that would outlive the launcher
        time.sleep(60)
        os._exit(0)
    tasks.forked.add(pid)
    tasks.reap()
    assert tasks.forked == {pid}  # still running
    tasks.stop()
    deadline = time.monotonic() + 10
    while tasks.forked and time.monotonic() < deadline:
        tasks.reap()
        time.sleep(0.05)
    assert not tasks.forked


@pytest.mark.deployment
def test_a_task_forked_after_warm_up_trains_with_threads_and_the_launcher_ran_no_model():
    """torch is imported, never run, in the launcher: a fork after torch starts its thread pools
    could hang. The child trains with two threads; the launcher's modules include no FAB code."""
    script = textwrap.dedent("""
        import os, sys, time
        from fedguard.clients.deployment.app_gate import warm_up, WARM_MODULES
        warm_up()
        assert all(name in sys.modules for name in WARM_MODULES), [n for n in WARM_MODULES if n not in sys.modules]
        assert not any("/flwr/apps/" in (getattr(m, "__file__", None) or "") for m in list(sys.modules.values()))
        pid = os.fork()
        if pid == 0:
            import torch
            torch.set_num_threads(2)
            model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            for _ in range(20):
                loss = torch.nn.functional.cross_entropy(model(torch.randn(512, 64)), torch.randint(0, 10, (512,)))
                optimizer.zero_grad(); loss.backward(); optimizer.step()
            os._exit(0 if torch.isfinite(loss) else 3)
        _, status = os.waitpid(pid, 0)
        sys.exit(os.waitstatus_to_exitcode(status))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fedguard.clients.app" in WARM_MODULES


def test_the_task_pulls_its_input_with_flowers_own_calls_in_flowers_order():
    """verified_clientapp.pull_task_input mirrors Flower 1.41's (only the object pull's backoff
    differs): the runtime API calls must be the same, in the same order, or the copy is stale."""
    import inspect
    import re

    from flwr.supernode.runtime import run_clientapp

    from fedguard.clients.deployment import verified_clientapp

    def calls(function) -> list[str]:
        return re.findall(r"client\.(\w+)", inspect.getsource(function))

    assert calls(verified_clientapp.pull_task_input) == calls(run_clientapp.pull_task_input) == [
        "PullTaskInput", "PullMessages", "PullObject", "ConfirmMessageReceived"]
    assert "initial_backoff=initial_backoff" in inspect.getsource(verified_clientapp.pull_task_input)


_SMALL_APP = {
    "pyproject.toml": textwrap.dedent("""\
        [build-system]
        requires = ["hatchling"]
        build-backend = "hatchling.build"

        [project]
        name = "smallapp"
        version = "1.0.0"
        dependencies = []

        [tool.flwr.app]
        publisher = "tester"

        [tool.flwr.app.components]
        serverapp = "smallapp.server:app"
        clientapp = "smallapp.client:app"

        [tool.flwr.app.config]
        """).encode(),
    "smallapp/__init__.py": b"",
    "smallapp/client.py": b"app = None\n",
    "smallapp/server.py": b"app = None\n",
}


def test_a_verified_fab_is_installed_once_and_any_other_copy_is_replaced(tmp_path, monkeypatch):
    """A task reinstalls only when the copy Flower would load differs from the verified FAB."""
    import hashlib

    from flwr.cli.build import build_fab_from_files
    from flwr.common.config import get_project_dir

    from fedguard.clients.deployment import verified_clientapp

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    fab = build_fab_from_files(_SMALL_APP)[0]
    fab_hash = hashlib.sha256(fab).hexdigest()
    installs = []
    real_install = verified_clientapp.install_from_fab
    monkeypatch.setattr(verified_clientapp, "install_from_fab",
                        lambda content, **kw: installs.append(1) or real_install(content, **kw))

    def install() -> bool:
        return verified_clientapp.install_once(fab, "tester/smallapp", "1.0.0", fab_hash)

    assert install() is True and len(installs) == 1
    directory = get_project_dir("tester/smallapp", "1.0.0", fab_hash)
    assert verified_clientapp.installed_copy_matches(fab, directory)
    assert install() is False and len(installs) == 1  # the same verified bytes: nothing to do

    (directory / "smallapp" / "client.py").write_bytes(b"import os; app = os.system\n")  # changed under us
    assert install() is True and (directory / "smallapp" / "client.py").read_bytes() == b"app = None\n"
    (directory / "smallapp" / "client.py").unlink()  # a partial copy
    assert install() is True and verified_clientapp.installed_copy_matches(fab, directory)
    (directory / "smallapp" / "planted.py").write_bytes(b"app = 1\n")  # a file the FAB lacks
    assert not verified_clientapp.installed_copy_matches(fab, directory)
    assert install() is True and len(installs) == 4
    # A link with the right bytes behind it: its target could change after the comparison.
    outside = tmp_path / "outside.py"
    outside.write_bytes((directory / "smallapp" / "client.py").read_bytes())
    (directory / "smallapp" / "client.py").unlink()
    (directory / "smallapp" / "client.py").symlink_to(outside)
    assert not verified_clientapp.installed_copy_matches(fab, directory)
    assert install() is True and not (directory / "smallapp" / "client.py").is_symlink()
