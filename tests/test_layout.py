"""The layout's promises: one concern per package, imports point down only, no import circles, and nothing installed
that shadows a common module name."""
import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# lowest first: a module may import its own package and the packages listed before it, never one after it
LAYERS = ["utils", "arguments", "scene", "gaussian_renderer", "guidance", "stages", "evaluation", "toyworld", "jobs"]
ENTRY_SCRIPTS = ["train", "form_path", "evaluate", "probe_ood", "batch", "export_mesh", "export_ply"]
# the copyable file and its two roles: imports nothing of the project
SELF_CONTAINED = {"guidance.ptd_utils"}


def project_modules() -> dict[str, Path]:
    modules = {name: ROOT / f"{name}.py" for name in ENTRY_SCRIPTS}
    for package in LAYERS:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The project modules a file imports anywhere in it (function-level imports count: they are dependencies)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from pkg import submodule` depends on the submodule; `from pkg import name` on pkg's __init__
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, set(modules)) - {name} for name, path in modules.items()}


def layer(module: str) -> int:
    top = module.split(".")[0]
    return len(LAYERS) if top in ENTRY_SCRIPTS else LAYERS.index(top)


def test_imports_point_down_only():
    upward = [(m, dep) for m, deps in graph().items() for dep in deps if layer(dep) > layer(m)]
    assert not upward, f"upward imports (module -> what it imports): {upward}"
    sideways = [(m, dep) for m, deps in graph().items() for dep in deps
                if m.split(".")[0] in ENTRY_SCRIPTS and dep.split(".")[0] in ENTRY_SCRIPTS]
    assert not sideways, f"entry scripts import each other: {sideways}"


def test_no_import_circles():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(edges[node]):
            if state.get(dep) == 1:
                circles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2
    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not circles, f"import circles: {circles}"


def test_leaves_and_the_copyable_file_import_nothing_of_the_project():
    edges = graph()
    for module, deps in edges.items():
        if module.startswith("utils"):
            assert all(d.startswith("utils") for d in deps), (module, deps)
        if module in SELF_CONTAINED:
            assert not deps, (module, deps)


def test_installed_packages_shadow_no_entry_script(tmp_path):
    """`pip install -e .` installs the library packages only: from another folder, `import evaluate` is not ours."""
    code = ("import importlib.util as u; names = %r; "
            "print([n for n in names if (s := u.find_spec(n)) and s.origin and s.origin.startswith(%r)])"
            % (ENTRY_SCRIPTS, str(ROOT)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"entry scripts importable from outside the checkout: {done.stdout}"
    setup = (ROOT / "setup.py").read_text()
    assert "py_modules" not in setup
    assert all(f'"{p}"' in setup for p in LAYERS)
