"""The layout a reader relies on: the card's files on top, the neighbours and the plumbing in their folders, short
files and functions, one statement per line, no results frozen in comments, and imports that flow one way (no
circle, lazy ones too; the plumbing imports no method)."""
import ast
import io
import re
import tokenize

from conftest import REPO

CARD = {"data", "rollout", "eval", "opd", "grpo", "tvdf"}  # the top level: the method, in reading order
FOLDERS = ("lib", "neighbours")                            # the plumbing, and the neighbour methods
FILES = {m: REPO / f"{m.replace('.', '/')}.py" for m in
         [p.stem for p in REPO.glob("*.py")] + [f"{d}.{p.stem}" for d in FOLDERS for p in (REPO / d).glob("*.py")]}
MODULES = sorted(m for m in FILES if not m.endswith("__init__"))
SOURCES = sorted(FILES.values()) + sorted((REPO / "tests").glob("*.py"))
MAX_FILE = 450      # lines of a file of the project
MAX_FUNCTION = 60   # lines of a function, its docstring included


def _imports(module):
    """The project modules `module` imports anywhere in the file (inside functions as well)."""
    tree = ast.parse(FILES[module].read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names & set(MODULES) - {module}


def test_the_top_level_is_the_card():
    assert {p.stem for p in REPO.glob("*.py")} == CARD
    assert all((REPO / d / "__init__.py").exists() for d in FOLDERS)
    assert {p.name for p in REPO.iterdir() if p.is_dir() and not p.name.startswith(".")} - {"__pycache__", "runs"} \
        == {"lib", "neighbours", "miniature", "docs", "tests"}


def test_every_file_is_at_most_450_lines():
    lengths = {m: len(path.read_text().splitlines()) for m, path in FILES.items()}
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
    quoted = {f"{p.name}:{line}": RESULT.search(text).group(0) for p in FILES.values()
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
    # the reading order of the README: data -> rollout -> eval -> opd -> grpo, tvdf; the neighbours build on them;
    # the plumbing in lib/ is called by all of them and imports no method (only data, rollout, eval: the model's
    # input and output, and the metrics)
    methods = {"opd", "grpo", "tvdf"} | {m for m in MODULES if m.startswith("neighbours.")}
    plumbing = {m for m in MODULES if m.startswith("lib.")}
    assert graph["data"] == set() and graph["rollout"] == {"data", "lib.fsdp", "lib.share"}
    assert graph["eval"] == {"data", "rollout", "lib.fsdp", "lib.report"}
    assert {m: graph[m] & methods for m in plumbing if graph[m] & methods} == {}
    assert methods & set().union(*(reachable(m) for m in plumbing)) == set()
    for method in methods - {"opd"}:
        assert "opd" in graph[method] and method not in reachable("opd")
