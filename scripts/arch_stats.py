"""Size and shape of a Python package: modules, lines, intra-package import arrows, import cycles.

Why: docs/ARCHITECTURE.md records the package's shape before and after a redesign, and these figures
must come from one repeatable command rather than from reading files by eye.

    python scripts/arch_stats.py                 # the mixtral_nb package next to this script
    python scripts/arch_stats.py path/to/pkg --per-module --json stats.json

An arrow is "module A imports module B" (each ordered pair once), read from the AST of every file,
imports inside functions included. ``from . import x`` points to the module ``x`` when it is one, else
to the package's ``__init__``; ``from .a import y`` points to ``a``. A subpackage's modules count one by
one; importing ``pkg.sub.mod`` is an arrow to ``mod`` only (not to ``pkg.sub``'s ``__init__``, which Python
also runs). Cycles are the strongly connected components of more than one module, once over every
arrow and once over the arrows that run at import time (module level, outside ``if TYPE_CHECKING``).
Decode loops (hand-written loops that sample tokens) are not counted here: that figure is manual.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Arrow:
    """One import statement's target inside the package, and where the statement sits."""

    source: str
    target: str
    in_function: bool
    type_checking: bool


@dataclass
class Stats:
    """What :func:`measure` found; ``as_dict`` is the JSON form."""

    package: str
    lines: dict[str, int]
    arrows: list[Arrow] = field(default_factory=list)

    def pairs(self, import_time_only: bool = False) -> set[tuple[str, str]]:
        """Distinct (importer, imported) pairs, without self-imports."""
        return {(a.source, a.target) for a in self.arrows if a.source != a.target
                and not (import_time_only and (a.in_function or a.type_checking))}

    def as_dict(self) -> dict:
        return {
            "package": self.package,
            "modules": len(self.lines),
            "lines": sum(self.lines.values()),
            "lines_per_module": self.lines,
            "import_arrows": len(self.pairs()),
            "import_time_arrows": len(self.pairs(import_time_only=True)),
            "function_level_imports": sum(a.in_function for a in self.arrows),
            "cycles": cycles(self.pairs()),
            "import_time_cycles": cycles(self.pairs(import_time_only=True)),
            "decode_loops": "not counted by this tool (a manual figure)",
        }


def module_name(root: Path, path: Path) -> str:
    """Dotted name of a file under the package folder ``root`` (``__init__.py`` names its package)."""
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module):
    """Yield (import node, inside a function, under ``if TYPE_CHECKING``) for every import in ``tree``."""
    def walk(node: ast.AST, in_function: bool, type_checking: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, in_function, type_checking
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield from walk(child, True, type_checking)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), in_function, True)
                for stmt in child.orelse:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), in_function, type_checking)
            else:
                yield from walk(child, in_function, type_checking)
    yield from walk(tree, False, False)


def _targets(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, modules: set[str]) -> list[str]:
    """The package's modules that one import statement points to."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = importer.split(".") if is_package else importer.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            stem = ".".join(base + ([node.module] if node.module else []))
        else:
            stem = node.module or ""
        names = []
        for alias in node.names:
            sub = f"{stem}.{alias.name}"
            names.append(sub if sub in modules else stem)
    found = []
    for name in names:
        while name and name not in modules:  # `import pkg.a.b` where b is a class: nearest module above
            name = name.rpartition(".")[0]
        if name:
            found.append(name)
    return found


def measure(root: Path) -> Stats:
    """Read every ``.py`` file under the package folder ``root``."""
    files = sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)
    names = {module_name(root, p): p for p in files}
    stats = Stats(package=root.name, lines={})
    for name, path in names.items():
        text = path.read_text(encoding="utf-8")
        stats.lines[name] = len(text.splitlines())
        tree = ast.parse(text, filename=str(path))
        for node, in_function, type_checking in _imports(tree):
            for target in _targets(node, name, path.name == "__init__.py", set(names)):
                stats.arrows.append(Arrow(name, target, in_function, type_checking))
    return stats


def cycles(pairs: set[tuple[str, str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    graph: dict[str, list[str]] = {}
    for a, b in sorted(pairs):
        graph.setdefault(a, []).append(b)
        graph.setdefault(b, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = len(index)
                stack.append(node)
                on_stack.add(node)
            if i < len(graph[node]):
                work.append((node, i + 1))
                nxt = graph[node][i]
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def report(stats: Stats, per_module: bool) -> str:
    """The figures as plain text, one per line."""
    d = stats.as_dict()
    short = lambda m: "__init__" if m == stats.package else m.removeprefix(stats.package + ".")
    lines = [
        f"package                      {d['package']}",
        f"modules                      {d['modules']}",
        f"lines                        {d['lines']}",
        f"import arrows                {d['import_arrows']} (module A imports B, each pair once; "
        f"{d['import_time_arrows']} run at import time)",
        f"function-level imports       {d['function_level_imports']} (statements)",
        f"import cycles                {len(d['cycles'])} (all arrows), "
        f"{len(d['import_time_cycles'])} (import-time arrows only)",
    ]
    for kind in ("cycles", "import_time_cycles"):
        for comp in d[kind]:
            lines.append(f"  {kind.replace('_', ' ')[:-1]}: {' '.join(short(m) for m in comp)} ({len(comp)} modules)")
    lines.append("decode loops                 not counted here: a manual figure (docs/ARCHITECTURE.md)")
    if per_module:
        fan_out: dict[str, int] = {}
        fan_in: dict[str, int] = {}
        for a, b in stats.pairs():
            fan_out[a] = fan_out.get(a, 0) + 1
            fan_in[b] = fan_in.get(b, 0) + 1
        lines.append("")
        lines.append(f"{'module':32} {'lines':>6} {'imports':>8} {'imported by':>12}")
        for name, n in sorted(stats.lines.items(), key=lambda kv: -kv[1]):
            lines.append(f"{short(name):32} {n:6} {fan_out.get(name, 0):8} {fan_in.get(name, 0):12}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parent.parent / "mixtral_nb"
    parser.add_argument("package", nargs="?", type=Path, default=default, help="package folder (default: %(default)s)")
    parser.add_argument("--per-module", action="store_true", help="also list lines and import fan-out/fan-in per module")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON to this file")
    args = parser.parse_args(argv)
    if not (args.package / "__init__.py").is_file():
        parser.error(f"{args.package} is not a package folder (no __init__.py); pass the folder that holds it")
    stats = measure(args.package)
    print(report(stats, args.per_module))
    if args.json:
        args.json.write_text(json.dumps(stats.as_dict(), indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
