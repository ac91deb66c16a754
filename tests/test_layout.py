"""The layout a reader relies on: short files and functions, one statement per line, no results frozen in comments,
and imports that flow one way (no circle, lazy ones too)."""
import ast
import io
import re
import tokenize

from conftest import REPO

MODULES = sorted(p.stem for p in REPO.glob("*.py"))
SOURCES = sorted(REPO.glob("*.py")) + sorted((REPO / "tests").glob("*.py"))
MAX_FILE = 450      # lines of a top-level file
MAX_FUNCTION = 60   # lines of a function, its docstring included


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
    assert {m: n for m, n in lengths.items() if n > MAX_FILE} == {}


def test_no_function_is_longer_than_60_lines():
    long = {}
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION:
                    long[f"{path.name}:{node.name}"] = length
    assert long == {}


def _packed(source):
    """Lines holding two statements: `a; b`, `a(), b()` as a statement, or `if x: y`."""
    found = [t.start[0] for t in tokenize.generate_tokens(io.StringIO(source).readline)
             if t.type == tokenize.OP and t.string == ";"]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Tuple):
            found.append(node.lineno)
        body = getattr(node, "body", None)
        if isinstance(node, ast.stmt) and isinstance(body, list) and body and body[0].lineno == node.lineno:
            found.append(node.lineno)
    return sorted(found)


def test_the_packed_line_check_finds_packed_lines():
    assert _packed("a = 1; b = 2\nf(), g()\nif a: b = 3\nx = (1, 2)\nif a:\n    b = 1\n") == [1, 2, 3]


def test_one_statement_per_line():
    assert {p.name: _packed(p.read_text()) for p in SOURCES if _packed(p.read_text())} == {}


# a result quoted in a comment or docstring: "measured: 3.4", "best 97.3", "ended at 49.3", "(94.7 / 93.2 / 31.1)"
RESULT = re.compile(r"measured:? *[~\d]|\b(mIoU|best|start|reached|ended at|collapsed|start at)\D{0,12}\d{2}\.\d"
                    r"|\(\d+\.\d+( / \d+\.\d+)+\)")


def _prose(source):
    """The comments and docstrings of a file: [(line, text)]."""
    out = [(t.start[0], t.string) for t in tokenize.generate_tokens(io.StringIO(source).readline)
           if t.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(node):
            out.append((node.body[0].lineno, ast.get_docstring(node)))
    return out


def test_the_result_check_finds_results():
    assert [line for line, _ in _prose("x = 1  # lr 1e-3: best 97.3\n# measured: 3.4 s\n")] == [1, 2]
    assert [bool(RESULT.search(t)) for _, t in _prose("x = 1  # lr 1e-3: best 97.3\n# 2 fps, lr 1e-6\n")] == [
        True, False]


def test_no_results_in_the_code_comments():
    """Numbers measured on the miniature live in the README and docs/ (regenerated), not in code comments (not)."""
    quoted = {f"{p.name}:{line}": RESULT.search(text).group(0) for p in REPO.glob("*.py")
              for line, text in _prose(p.read_text()) if RESULT.search(text)}
    assert quoted == {}


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
    # the reading order of the README: data -> rollout -> eval -> opd -> the methods built on it; the miniature (toy),
    # the reporting (report) and the plumbing (cli, fsdp) are used by the scripts and import none of them
    assert graph["data"] == set() and graph["rollout"] == {"data"} and graph["fsdp"] == set()
    assert graph["eval"] == {"data", "rollout", "report"} and graph["report"] == {"data"}
    assert graph["toy"] == {"data", "eval", "rollout"}
    assert {"grpo", "tvdf", "dpo", "va_opd", "visd", "opd"} & (reachable("toy") | reachable("cli")) == set()
    for method in ("grpo", "tvdf", "dpo", "va_opd", "visd"):
        assert "opd" in graph[method] and method not in reachable("opd")
