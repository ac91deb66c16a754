"""The layout a reader relies on: short top-level files, and imports that flow one way (no circle, lazy ones too)."""
import ast

from conftest import REPO

MODULES = sorted(p.stem for p in REPO.glob("*.py"))


def _imports(module):
    """The project modules `module` imports anywhere in the file (inside functions as well)."""
    tree = ast.parse((REPO / f"{module}.py").read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names & set(MODULES) - {module}


def test_every_top_level_file_is_at_most_450_lines():
    lengths = {m: len((REPO / f"{m}.py").read_text().splitlines()) for m in MODULES}
    assert {m: n for m, n in lengths.items() if n > 450} == {}


def test_imports_flow_one_way():
    graph = {m: _imports(m) for m in MODULES}

    def reachable(start):
        seen, todo = set(), [start]
        while todo:
            for b in graph[todo.pop()] - seen:
                seen.add(b)
                todo.append(b)
        return seen

    assert [m for m in MODULES if m in reachable(m)] == []  # no circle
    # the reading order of the README: data -> eval -> opd -> the methods built on it; the miniature (toy) and the
    # plumbing (cli, fsdp) are used by the scripts and import none of them
    assert graph["data"] == set() and graph["eval"] == {"data"} and graph["fsdp"] == set()
    assert graph["toy"] == {"data", "eval"}
    assert {"grpo", "tvdf", "dpo", "va_opd", "visd", "opd"} & (reachable("toy") | reachable("cli")) == set()
    for method in ("grpo", "tvdf", "dpo", "va_opd", "visd"):
        assert "opd" in graph[method] and method not in reachable("opd")
