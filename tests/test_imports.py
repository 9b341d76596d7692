"""The package's structure: data flows one way, with no import cycle, not even a hidden one.

cli -> train/trainer -> components -> config / hardware / errors (DESIGN.md, "Layout")."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "stalwart"

# the bottom layer: imports nothing of stalwart but itself and errors
BOTTOM = {"stalwart.config", "stalwart.config_base", "stalwart.hardware", "stalwart.errors"}
# the top: what no component may import
TOP = {"stalwart.cli", "stalwart.__main__", "stalwart.train", "stalwart.trainer", "stalwart.bench"}
# The CLI imports each command's module when that command runs (`stalwart config` should not
# pay for torch.distributed, matplotlib, ...): its function-level imports are a dispatch table.
LAZY_OK = {"stalwart.cli"}


def modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = ("stalwart", *path.relative_to(PKG).with_suffix("").parts)
        out[".".join(parts).removesuffix(".__init__")] = path
    return out


def _resolve(name: str, mods: dict) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def imports(mod: str, path: Path, mods: dict) -> tuple[set[str], set[str]]:
    """(module-level imports, function-level imports) of stalwart modules."""
    top, late = set(), set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rpartition(".")[0]
                base = f"{pkg}.{base}" if base else pkg
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for name in names:
            target = _resolve(name, mods)
            if target and target != mod and target != "stalwart":
                (top if node.col_offset == 0 else late).add(target)
    return top, late


def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    mods = modules()
    edges, lazy = {}, {}
    for mod, path in mods.items():
        top, late = imports(mod, path, mods)
        edges[mod], lazy[mod] = top | late, late
    return edges, lazy


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_not_even_through_function_level_imports():
    edges, _ = graph()
    assert len(edges) > 40
    assert cycles(edges) == []


def test_function_level_imports_are_only_for_optional_dependencies():
    _, lazy = graph()
    hidden = {m: sorted(t) for m, t in lazy.items() if t and m not in LAZY_OK}
    assert hidden == {}


def test_data_flows_one_way():
    edges, _ = graph()
    for mod in BOTTOM:
        assert edges[mod] <= BOTTOM, mod
    for mod, targets in edges.items():
        if mod in TOP or mod.startswith("stalwart.experiments"):
            continue
        assert not targets & TOP, f"{mod} imports {sorted(targets & TOP)}"
        assert not any(t.startswith("stalwart.experiments") for t in targets), mod


def test_every_module_imports_first_in_a_fresh_interpreter():
    """Each module as the entry point (a cycle can hide behind import order)."""
    names = sorted(m for m in modules() if m != "stalwart.__main__")
    script = (
        "import importlib, sys\n"
        "import torch, numpy\n"  # loaded once: the point is stalwart's own import order
        f"for name in {names!r}:\n"
        "    for m in [m for m in sys.modules if m == 'stalwart' or m.startswith('stalwart.')]:\n"
        "        del sys.modules[m]\n"
        "    importlib.import_module(name)\n"
        "print('ok', len(" + repr(names) + "))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok")
