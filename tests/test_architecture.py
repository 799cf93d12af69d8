"""The import graph of `library/`: no circle, and nothing climbing up to the CLI or the bench.

Every import counts, at module level or inside a function, under TYPE_CHECKING or
not: an import deferred to run time is still a dependency a reader must follow,
and a circle hidden in a function is still a circle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.conftest import ROOT

LIBRARY = ROOT / "library"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The modules `path` imports, as names of modules (a `from package import module`
    names the module; a `from module import name` names the module)."""
    package = (
        module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    )
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {
        name for name in found if name in modules or name.split(".")[0] in ("pipeline", "bench")
    }


def import_graph() -> dict[str, set[str]]:
    paths = sorted(LIBRARY.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imported_modules(p, modules) - {module_name(p)} for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of the graph, as the modules along it, or None."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in on_path:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in done and (found := visit(nxt)):
                return found
        path.pop()
        on_path.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done and (found := visit(start)):
            return found
    return None


def test_the_library_has_no_import_circle() -> None:
    graph = import_graph()
    assert len(graph) > 20  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_library_never_imports_the_cli_or_the_bench() -> None:
    upward = {
        module: sorted(name for name in names if name.split(".")[0] in ("pipeline", "bench"))
        for module, names in import_graph().items()
    }
    assert {m: names for m, names in upward.items() if names} == {}


def test_the_stages_stand_apart() -> None:
    """Validation does not reach into the source, and the codecs only into their protocol."""
    graph = import_graph()
    assert "library.stages.source" not in graph["library.stages.validate"]
    for codec in ("library.score.codecs_mlflow", "library.score.codecs_v2"):
        assert graph[codec] & {"library.score.codec", "library.score.client"} == set()
        assert "library.score.protocol" in graph[codec]


# Lower layers never import higher ones: the stages, the scoring client, the state and
# the observability know nothing of the jobs that run them, nor of the demo tools.
LOWER = ("library.stages", "library.score", "library.state", "library.observability")
HIGHER = ("library.jobs", "library.demo")


def test_the_parts_never_reach_up_into_the_jobs() -> None:
    graph = import_graph()
    lower = [m for m in graph if m.startswith(LOWER)]
    assert len(lower) > 10  # the walk found the folders
    reaching_up = {m: sorted(t for t in graph[m] if t.startswith(HIGHER)) for m in lower}
    assert {m: t for m, t in reaching_up.items() if t} == {}


LEDGER_TABLES = ("source_objects", "run_objects", "pipeline_runs")
WRITES = re.compile(
    r"\b(?:INSERT\s+INTO|UPDATE|DELETE\s+FROM)\s+(" + "|".join(LEDGER_TABLES) + r")\b",
    re.IGNORECASE,
)


def test_only_the_ledger_writes_its_tables() -> None:
    """The sink's flush asks the ledger for its part (`ledger.flush_statement`)."""
    writers = {
        module_name(path): sorted(set(WRITES.findall(path.read_text())))
        for path in sorted(LIBRARY.rglob("*.py"))
        if path.name != "ledger.py"
    }
    assert {m: tables for m, tables in writers.items() if tables} == {}
    assert set(WRITES.findall((LIBRARY / "state" / "ledger.py").read_text())) == set(LEDGER_TABLES)
