"""The package's shape: packages in layers, no import cycle inside pteenet/, no private name used across modules.

Every module is parsed with ``ast`` (nothing is imported), and every import statement counts, at
module level or inside a function: a lazy import that dodges a cycle is still a cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import NamedTuple

import pteenet

ROOT = Path(pteenet.__file__).parent
PACKAGE = "pteenet"


def _modules() -> dict[str, Path]:
    """Dotted name -> file, for every module and package of pteenet."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _base(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The module a ``from X import ...`` reads from, as a dotted name."""
    if node.level == 0:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


class Import(NamedTuple):
    target: str  # the intra-package module imported
    names: list[str]  # names taken from it (``from target import a, b``); empty for the module itself
    bound: str | None  # the local name the module itself is bound to, if it is
    line: int


def _imports(module: str) -> list[Import]:
    """Every import of an intra-package module, wherever the statement is."""
    path = MODULES[module]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(a.name, [], a.asname or a.name.split(".")[0], node.lineno)
                      for a in node.names if a.name in MODULES]
        elif isinstance(node, ast.ImportFrom):
            base = _base(module, path, node)
            if base not in MODULES:
                continue
            names = []
            for a in node.names:
                if f"{base}.{a.name}" in MODULES:  # ``from . import policies``: the submodule itself
                    found.append(Import(f"{base}.{a.name}", [], a.asname or a.name, node.lineno))
                else:
                    names.append(a.name)
            if names:
                found.append(Import(base, names, None, node.lineno))
    return found


def _graph() -> dict[str, set[str]]:
    return {m: {i.target for i in _imports(m) if i.target != m} for m in MODULES}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path (first node repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_the_parser_sees_the_package() -> None:
    graph = _graph()
    assert {"pteenet", "pteenet.exits.policies", "pteenet.sweep", "pteenet.evaluation.engine", "pteenet.cli"} <= set(graph)
    assert "pteenet.evaluation.cache" in graph["pteenet.evaluation.engine"]  # relative imports resolve
    assert "pteenet.exits.policies" in graph["pteenet.runtime.model"]  # ``from . import policies``


def test_no_import_cycle() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_cycle_finder_finds_one() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_private_name_across_modules() -> None:
    bad = []
    for module in MODULES:
        aliases = {}  # local name -> intra-package module, for ``pol._name`` look-ups
        for imp in _imports(module):
            if imp.target == module:
                continue
            bad += [f"{module}:{imp.line} imports {imp.target}.{n}" for n in imp.names if _private(n)]
            if imp.bound:
                aliases[imp.bound] = imp.target
        for node in ast.walk(ast.parse(MODULES[module].read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and _private(node.attr)):
                bad.append(f"{module}:{node.lineno} reads {aliases[node.value.id]}.{node.attr}")
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def _imports_rich(module: str) -> list[int]:
    """Lines of ``module`` that import rich (``import rich...`` or ``from rich... import``)."""
    lines = []
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
        if any(n == "rich" or n.startswith("rich.") for n in names):
            lines.append(node.lineno)
    return lines


def test_rich_lives_in_the_cli_only() -> None:
    """The library reports through ``pteenet.progress.Sink``; drawing it is the CLI's business."""
    assert _imports_rich("pteenet.cli.sink")  # the finder sees Rich where it is
    bad = [f"{m}:{line}" for m in MODULES if m != "pteenet.cli" and not m.startswith("pteenet.cli.")
           for line in _imports_rich(m)]
    assert not bad, "Rich imported outside pteenet/cli: " + ", ".join(bad)


# The packages from the bottom up: each imports only from itself, the base and the packages before it.
# The base is the top-level modules (errors, configs, progress, devices, atomic writes, distributed,
# version); it imports nothing above itself. ``pteenet/__init__.py`` (the public API) and ``__main__`` may import anything.
# The order is the pipeline's: ``evaluation`` (the exit cache and the engine over it) sits below training,
# which scores its calibration split with it, and the sweep above training.
LAYERS = ("backbones", "exits", "tracing", "data", "runtime", "evaluation", "training", "sweep", "export", "bench", "cli")


def _layer(module: str) -> int:
    """0 for the base, 1 + the index in LAYERS for a package's modules."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LAYERS:
        return 1 + LAYERS.index(parts[1])
    return 0


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a module from a higher layer (or, in the base, of any package)."""
    return [f"{m} imports {t}" for m in sorted(graph) if m not in (PACKAGE, f"{PACKAGE}.__main__") for t in sorted(graph[m])
            if t != PACKAGE and (_layer(t) > _layer(m) or (_layer(t) == _layer(m) == 0 and t.count(".") > 1))]


def test_top_level_holds_only_packages_and_the_base() -> None:
    base = {"__init__", "__main__", "errors", "configs", "progress", "devices", "atomic", "distributed", "version"}
    flat = {p.stem for p in ROOT.glob("*.py")}
    assert flat <= base, f"modules outside a package: {sorted(flat - base)}"
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    assert packages == set(LAYERS), f"packages not in LAYERS: {sorted(packages ^ set(LAYERS))}"


def test_packages_import_only_from_lower_layers() -> None:
    bad = upward_imports(_graph())
    assert not bad, "imports against the layer order (LAYERS in this file):\n" + "\n".join(bad)


def test_layer_check_sees_an_upward_import() -> None:
    graph = _graph()
    assert not upward_imports(graph)
    graph["pteenet.exits.policies"] = graph["pteenet.exits.policies"] | {"pteenet.runtime.model"}
    graph["pteenet.configs"] = graph["pteenet.configs"] | {"pteenet.exits.policies"}
    assert upward_imports(graph) == ["pteenet.configs imports pteenet.exits.policies",
                                     "pteenet.exits.policies imports pteenet.runtime.model"]


def _long_functions(limit: int = 60) -> list[str]:
    """Functions longer than ``limit`` lines, not counting their docstring."""
    out = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = node.body[0].end_lineno + 1 if ast.get_docstring(node) and len(node.body) > 1 else node.lineno
                if node.end_lineno - start + 1 > limit:
                    out.append(f"{module}.{node.name}: {node.end_lineno - start + 1} lines")
    return out


def test_modules_and_functions_stay_short() -> None:
    long_modules = [f"{m}: {n} lines" for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 400]
    assert not long_modules, "modules over 400 lines: " + ", ".join(long_modules)
    assert not _long_functions(), "functions over 60 lines: " + ", ".join(_long_functions())


TESTS = Path(__file__).parent


def imported_test_modules(path: Path) -> list[str]:
    """The ``test_*`` modules that the test file ``path`` imports."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return [n for n in names if n.split(".")[0].startswith("test_")]


def test_no_test_module_imports_another(tmp_path: Path) -> None:
    """Shared helpers live in tests/helpers.py and fixtures in tests/conftest.py, not in a test module
    another one reaches into (its private names and fixtures then change under it)."""
    bad = [f"{p.name} imports {', '.join(found)}" for p in sorted(TESTS.glob("*.py")) if (found := imported_test_modules(p))]
    assert not bad, "test modules importing test modules:\n" + "\n".join(bad)
    sneaky = tmp_path / "test_x.py"
    sneaky.write_text("import pytest\nfrom test_sweep_cli import trained\nif True:\n    import test_data as d\n")
    assert imported_test_modules(sneaky) == ["test_sweep_cli", "test_data"]  # the check sees both forms, anywhere

