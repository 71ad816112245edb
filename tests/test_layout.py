"""The package's house rules, read from its source: every module in a stage folder, imports pointing down the
README's order of stages, no import circle, no file over 450 lines, at most 3 function-local imports of our own."""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "taylormlp"
# bottom to top, as the README's "How the code is laid out" lists them; the package's __init__ (the public API) is
# above them all
STAGES = ("runtime", "common", "maths", "release", "serve", "measure", "protection", "attacks", "cli")
MAX_LINES = 450
MAX_LOCAL_IMPORTS = 3


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_imports(path: Path, name: str | None = None):
    """(imported module, lineno, inside a function) for each import of our own modules in `path` (module `name`)."""
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    here = (name or module_name(path)).split(".")
    base = here if path.name == "__init__.py" else here[:-1]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                target = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("taylormlp"):
                continue
            for alias in node.names:
                name = f"{target}.{alias.name}"
                yield (name if name in modules else target), node.lineno, id(node) in local
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("taylormlp"):
                    yield alias.name, node.lineno, id(node) in local


RUNTIME = ("runtime", "series_module")  # the files every release carries verbatim: the runtime stage, at the top


def stage(module: str) -> int:
    parts = module.split(".")
    return len(STAGES) if len(parts) == 1 else 0 if parts[1] in RUNTIME else STAGES.index(parts[1])


def graph() -> dict[str, set[str]]:
    edges = {}
    for path in PACKAGE.rglob("*.py"):
        edges[module_name(path)] = {m for m, _, _ in package_imports(path) if m != module_name(path)}
    return edges


def test_every_module_sits_in_a_stage_folder():
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).parts
        assert parts == ("__init__.py",) or parts[0].removesuffix(".py") in RUNTIME or parts[0] in STAGES, path


def test_imports_point_down_the_stages():
    upward = [(m, t) for m, targets in graph().items() for t in targets if stage(t) > stage(m)]
    assert upward == []


def test_no_import_circle():
    edges = graph()
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                pytest.fail("import circle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])


def test_no_file_over_the_line_limit():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


def test_few_function_local_imports_of_our_own():
    local = [(str(p.relative_to(PACKAGE)), line, m) for p in PACKAGE.rglob("*.py")
             for m, line, inside in package_imports(p) if inside]
    assert len(local) <= MAX_LOCAL_IMPORTS, local


def test_the_checks_see_a_wrong_import(tmp_path):
    """The rules above can fail: a common/ module importing protection/ points up, and is found inside a function."""
    bad = tmp_path / "bad.py"
    bad.write_text("from ..protection.throttle import Line\n\n\ndef f():\n    from . import errors\n")
    found = list(package_imports(bad, "taylormlp.common.bad"))
    assert found == [("taylormlp.protection.throttle", 1, False), ("taylormlp.common.errors", 5, True)]
    assert stage(found[0][0]) > stage("taylormlp.common.bad")


def test_the_runtime_files_import_only_torch_transformers_the_standard_library_and_each_other():
    """runtime.py and series_module.py are copied verbatim into every release: there, nothing else of ours exists."""
    allowed = {"torch", "transformers", "__future__", *sys.stdlib_module_names}
    for name in RUNTIME:
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] in allowed for a in node.names), (name, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: only the other runtime file, beside it in the release
                    assert node.level == 1 and node.module in RUNTIME, (name, node.lineno)
                else:
                    assert node.module.split(".")[0] in allowed, (name, node.lineno, node.module)
