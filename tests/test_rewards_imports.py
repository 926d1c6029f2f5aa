"""Imports of rewards and data: one way, no cycles (function-local imports included), data free of
the reward machinery, and the scripts shipped into the sandbox standing alone."""

import ast
import collections
import pathlib
import subprocess
import sys

import pytest

from g2rpo_jax.rewards import harness

PACKAGE_ROOT = pathlib.Path(__file__).resolve().parent.parent
CHECKED = ("g2rpo_jax/rewards", "g2rpo_jax/data", "g2rpo_jax/task_format.py")


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def checked_modules() -> dict[str, pathlib.Path]:
    paths = []
    for place in CHECKED:
        path = PACKAGE_ROOT / place
        paths += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return {module_name(path): path for path in paths}


def imported_modules(name: str, path: pathlib.Path, known) -> set[str]:
    """The checked modules `name` imports anywhere in its code (a name imported from a module
    counts as that module, a submodule imported from a package as the submodule)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = checked_modules()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def cycle_through(graph, start):
    """A path start -> ... -> start, or None."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for child in sorted(graph[node]):
            if child == start:
                return path + [start]
            if child not in seen:
                seen.add(child)
                stack.append((child, path + [child]))
    return None


def test_rewards_and_data_import_one_way():
    graph = import_graph()
    cycles = [cycle for cycle in (cycle_through(graph, name) for name in sorted(graph)) if cycle]
    assert cycles == []


def test_data_imports_nothing_of_the_rewards():
    graph = import_graph()
    data_imports = {target for name, targets in graph.items() if name.startswith("g2rpo_jax.data")
                    for target in targets}
    assert not [target for target in data_imports if target.startswith("g2rpo_jax.rewards")]


# --------------------------------------------------------------------------------------------
# The sandbox scripts: modules of the harness package, shipped as one file each.

def harness_module_paths():
    return sorted(pathlib.Path(harness.__file__).parent.glob("*.py"))


@pytest.mark.parametrize("path", harness_module_paths(), ids=lambda p: p.name)
def test_harness_modules_import_only_the_standard_library_and_siblings(path):
    if path.name == "__init__.py":
        return  # the host side: it assembles the scripts and is never shipped
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module]
        else:
            continue
        assert all(n.partition(".")[0] in sys.stdlib_module_names for n in names), names


@pytest.mark.parametrize("entry", sorted(harness.SCRIPTS))
def test_each_script_stands_alone_and_defines_each_name_once(entry):
    tree = ast.parse(harness.script(entry))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert not node.level and node.module.partition(".")[0] in sys.stdlib_module_names
    definitions = collections.Counter()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            definitions[node.name] += 1
        elif isinstance(node, ast.Assign):
            definitions.update(t.id for t in node.targets if isinstance(t, ast.Name))
    assert [name for name, count in definitions.items() if count > 1] == []
    assert sum(line.startswith("if __name__ == ") for line in harness.script(entry).split("\n")) == 1


def test_the_stdio_runner_runs_without_the_package(tmp_path):
    (tmp_path / "runner.py").write_text(harness.script("stdio_main"))
    (tmp_path / "main.py").write_text("print(int(input()) * 2, __name__)\nexit()\nprint('unreached')\n")
    result = subprocess.run([sys.executable, "-I", "-S", "-B", "runner.py"], input="21\n", cwd=tmp_path,
                            capture_output=True, text=True, timeout=30, env={})
    assert (result.returncode, result.stdout) == (0, "42 __main__\n"), result.stderr


def test_a_relative_import_below_the_top_level_is_refused():
    source = "def f():\n    from .wire import Pipe\n"
    with pytest.raises(ValueError, match="top level"):
        harness._without_package_imports(source, "bad.py")
