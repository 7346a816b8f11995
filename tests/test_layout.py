"""The layout: which project modules import which (read from the source, imports inside
functions included), so that a change that ties the packages in a knot fails here."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(package: str) -> dict[str, set[str]]:
    """module -> the modules of `package` it imports, anywhere in its source."""
    modules = {module_name(p): p for p in (REPO / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                submodules = [f"{node.module}.{a.name}" for a in node.names
                              if f"{node.module}.{a.name}" in modules]
                targets = submodules or [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            imported |= {t for t in targets if t in modules and t != name}
        graph[name] = imported
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph`, or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node):], node]
        if node in done:
            return None
        for target in sorted(graph[node]):
            if found := visit(target, [*path, node]):
                return found
        done.add(node)
        return None

    return next((c for node in sorted(graph) if (c := visit(node, []))), None)


@pytest.mark.parametrize("package", ["trainable", "spaces"])
def test_a_package_imports_its_modules_without_a_cycle(package: str) -> None:
    assert cycle(project_imports(package)) is None


def test_the_cycle_finder_finds_one() -> None:
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_the_trial_states_of_trials_parquet_are_ray_tunes_own() -> None:
    from ray.tune.experiment import Trial

    from trainable import result_keys

    for state in ("PENDING", "RUNNING", "TERMINATED", "ERROR"):
        assert getattr(result_keys, state) == getattr(Trial, state)


# search/'s rooms (subpackages and top-level modules) and the rooms each may import: the data
# flow reads top-down, from the run directory to the commands. cli.py may import any.
SEARCH_IMPORTS = {
    "rundir": set(), "defaults": set(), "study": {"rundir"},
    "views": {"rundir", "study"},
    "record": {"rundir", "study", "views"},
    "ensembles": {"rundir", "study", "views"},
    "sampling": {"rundir", "study"},
    "run": {"rundir", "study", "defaults", "views", "record", "sampling"},
    "commands": {"rundir", "study", "defaults", "views", "run"},
}


def room(module: str) -> str:
    """search.run.driver -> run; search.rundir -> rundir."""
    return module.split(".")[1] if "." in module else module


def test_search_imports_point_one_way_between_its_rooms() -> None:
    wrong = sorted((source, target) for source, targets in project_imports("search").items()
                   for target in targets
                   if room(source) not in ("cli", "search", room(target))
                   and room(target) not in SEARCH_IMPORTS[room(source)])
    assert not wrong


def test_search_has_few_top_level_modules_and_small_rooms() -> None:
    top = [p for p in (REPO / "search").glob("*.py") if p.name != "__init__.py"]
    assert len(top) <= 8, sorted(p.name for p in top)
    for folder in (p for p in (REPO / "search").iterdir() if (p / "__init__.py").exists()):
        modules = [p for p in folder.glob("*.py") if p.name != "__init__.py"]
        assert len(modules) <= 10, folder.name
        assert set(SEARCH_IMPORTS) >= {folder.name}, folder.name  # a room with its rules


def test_a_module_of_the_old_flat_layout_imports_as_the_one_it_became() -> None:
    """Tune's saved state of a search interrupted before the move names the old paths."""
    import pickle

    from search.run.study_search import StudySearch

    old = pickle.dumps(StudySearch, protocol=0).replace(b"search.run.study_search",
                                                        b"search.study_search")
    assert pickle.loads(old) is StudySearch
    from search import MOVED

    for name, new in MOVED.items():
        assert importlib.import_module(f"search.{name}") is importlib.import_module(
            f"search.{new}")
