"""The shape of the house, read from the source: one namespace, imports only in the allowed
directions, no cycles, privacy/ a library of plain numbers, one table of strategy params.

The import graph is built with ``ast`` from every module under the product's folders, so a
new module that breaks a rule fails here before anyone has to notice it in review.
"""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "fedguard"
PACKAGES = ("server", "clients", "privacy", "conf", "simulations")
# DESIGN.md's import directions: a package may import itself and these.
ALLOWED: dict[str, set[str]] = {
    "simulations": {"server", "clients", "conf", "privacy"},
    "server": {"clients", "conf", "privacy"},
    "clients": {"conf", "privacy"},
    "conf": {"privacy"},
    "privacy": set(),
}
# privacy/ is the numeric and cryptographic core: no Flower records, no Hydra config.
PRIVACY_FORBIDDEN_THIRD_PARTY = ("flwr", "omegaconf", "hydra", "ray", "rich", "matplotlib")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([NAMESPACE, *parts])


def _source_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            modules[_module_name(path)] = path
    return modules


def _imported_names(module: str, path: Path) -> list[str]:
    """Every module name an import statement in ``path`` names (absolute, relative resolved),
    including imports inside functions: a lazy import is still a dependency."""
    names = []
    package_parts = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            names.append(target)
            names.extend(f"{target}.{alias.name}" for alias in node.names)
    return names


def _dependencies(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules ``module`` depends on. ``from package import submodule`` depends on the
    submodule (Python runs every package's __init__ on the way to any submodule; counting
    that would make each package's __init__ a dependency of everything below it)."""
    names = set(_imported_names(module, path))
    submodule_parents = {name.rpartition(".")[0] for name in names if name in modules}
    from_parents = {
        name for name in names
        if name in modules and any(other.startswith(f"{name}.") and other in modules for other in names)
    }
    return {name for name in names if name in modules and name != module} - (from_parents & submodule_parents)


def _graph() -> dict[str, set[str]]:
    modules = _source_modules()
    edges: dict[str, set[str]] = defaultdict(set)
    for module, path in modules.items():
        edges[module] = _dependencies(module, path, modules)
    return edges


def _package(module: str) -> str:
    return module.split(".")[1]


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path, or None (iterative DFS with colours)."""
    state: dict[str, int] = {}
    for start in sorted(edges):
        if state.get(start):
            continue
        stack = [(start, iter(sorted(edges.get(start, ()))))]
        path = [start]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return [*path[path.index(child):], child]
            elif not state.get(child):
                state[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(edges.get(child, ())))))
    return None


def test_the_graph_sees_every_package_and_real_edges():
    """Guards the guard: an empty or broken graph would make every rule below pass."""
    edges = _graph()
    assert {_package(m) for m in _source_modules()} == set(PACKAGES)
    assert "fedguard.privacy.accounting" in edges["fedguard.clients.private_training"]
    assert "fedguard.clients.wire.protocol" in edges["fedguard.server.app"]


def test_no_import_cycle_between_modules():
    assert _cycle(_graph()) is None, f"import cycle: {' -> '.join(_cycle(_graph()) or [])}"


def test_no_import_cycle_between_packages():
    packages: dict[str, set[str]] = defaultdict(set)
    for module, targets in _graph().items():
        packages[_package(module)].update(_package(t) for t in targets if _package(t) != _package(module))
    assert _cycle(packages) is None


def test_imports_go_only_in_the_allowed_directions():
    wrong = sorted(
        f"{module} -> {target}"
        for module, targets in _graph().items()
        for target in targets
        if _package(target) != _package(module) and _package(target) not in ALLOWED[_package(module)]
    )
    assert wrong == []


def test_cycle_finder_finds_a_planted_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None


def test_nothing_imports_the_bare_top_level_names():
    """Every internal import names the fedguard namespace; `import conf` would pick up a user's module."""
    bare = sorted(
        f"{module}: {name}"
        for module, path in _source_modules().items()
        for name in _imported_names(module, path)
        if name.split(".")[0] in PACKAGES
    )
    test_files = sorted((ROOT / "tests").glob("*.py"))
    bare += sorted(
        f"tests/{path.name}: {name}"
        for path in test_files
        for name in _imported_names(f"tests.{path.stem}", path)
        if name.split(".")[0] in PACKAGES
    )
    assert bare == []


def test_privacy_is_a_library_of_plain_numbers():
    offending = sorted(
        f"{module}: {name}"
        for module, path in _source_modules().items()
        if _package(module) == "privacy"
        for name in _imported_names(module, path)
        if name.split(".")[0] in PRIVACY_FORBIDDEN_THIRD_PARTY
        or (name.startswith(f"{NAMESPACE}.") and _package(name) != "privacy")
    )
    assert offending == []


@pytest.mark.deployment  # starts a separate process
def test_installed_package_lives_only_under_the_namespace(tmp_path):
    """From a directory that is not the checkout, `import server` fails and `import fedguard.server` works."""
    probe = (
        "import importlib.util, sys\n"
        "bare = [n for n in ('server', 'clients', 'privacy', 'conf', 'simulations') if importlib.util.find_spec(n)]\n"
        "import fedguard.server, fedguard.clients.app, fedguard.conf\n"
        "print(','.join(bare))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def test_flower_app_components_name_the_namespace():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert 'serverapp = "fedguard.server.app:app"' in text
    assert 'clientapp = "fedguard.clients.app:app"' in text


def test_strategy_params_table_matches_flowers_signatures():
    """conf/ checks strategy.params against a table (so it needs neither Flower nor server/);
    the table must be exactly what the Flower classes accept beyond what fedguard sets."""
    from fedguard.conf.strategy_params import STRATEGY_PARAMS
    from fedguard.server.strategies import RESERVED_STRATEGY_PARAMS, STRATEGY_CLASSES

    assert set(STRATEGY_PARAMS) == set(STRATEGY_CLASSES)
    for name, cls in STRATEGY_CLASSES.items():
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self", *RESERVED_STRATEGY_PARAMS}
        assert STRATEGY_PARAMS[name] == accepted, name


@pytest.mark.parametrize("limit", [400])
def test_no_source_module_is_far_over_the_size_guide(limit):
    """~400 lines is the guide; 10% over is tolerated, more needs a split."""
    long = sorted(
        f"{path.relative_to(ROOT)}: {n}"
        for path in _source_modules().values()
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > limit * 1.1
    )
    assert long == []
