"""No import cycles among shitu_cli's modules: the imports that run when a module loads (its top-level
statements, a package's __init__ included; `if TYPE_CHECKING:` blocks and imports inside functions left
out) form no loop. Read with ast, nothing imported."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "shitu_cli"


def _module_names(root: Path) -> dict[str, Path]:
    names = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _load_time_imports(tree: ast.Module):
    """Import statements that run at load: top level, and inside top-level if/try blocks (not TYPE_CHECKING)."""
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.If, ast.Try)):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            yield from (n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))


def _targets(module: str, is_package: bool, node, names: dict[str, Path]) -> set[str]:
    if isinstance(node, ast.Import):
        wanted = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".") if is_package else module.split(".")[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join(package + ([base] if base else []))
        # `from pkg import sub` loads pkg (its __init__) and pkg.sub when sub is a module
        wanted = [base] + [f"{base}.{alias.name}" for alias in node.names]
    found = set()
    for name in wanted:
        while name and name not in names:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)
    return found


def import_cycles(root: Path) -> list[list[str]]:
    """Every loop of load-time imports among the modules under `root` (a package folder), as module names."""
    names = _module_names(root)
    graph = {module: set() for module in names}
    for module, path in names.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in _load_time_imports(tree):
            graph[module] |= _targets(module, path.name == "__init__.py", node, names)
    cycles, state = [], {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, trail + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return cycles


def test_shitu_cli_modules_import_one_another_without_a_cycle():
    assert import_cycles(PACKAGE) == []


def test_the_check_finds_a_cycle_through_a_package_init_and_ignores_lazy_and_type_only_imports(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("", encoding="utf-8")
    (package / "sub" / "__init__.py").write_text("from pkg.sub.b import thing\n", encoding="utf-8")
    (package / "sub" / "b.py").write_text("from pkg.a import other\nthing = 1\n", encoding="utf-8")
    (package / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.c\n"
                                  "def f():\n    import pkg.c\nfrom pkg import sub\nother = 2\n", encoding="utf-8")
    (package / "c.py").write_text("import pkg.a\n", encoding="utf-8")
    assert import_cycles(package) == [["pkg.a", "pkg.sub", "pkg.sub.b", "pkg.a"]]
