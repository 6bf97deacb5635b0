"""diffueraser_core's modules import each other without cycles, and each imports alone in a fresh interpreter."""

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "diffueraser_core"


def _modules():
    mods = {}
    for folder, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                mod = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                mods[mod[: -len(".__init__")] if mod.endswith(".__init__") else mod] = path
    return mods


def _targets(mods, mod, node):
    """Package modules an import statement of ``mod`` refers to (lazy imports inside functions count too)."""
    package = mod if mods[mod].endswith("__init__.py") else mod.rsplit(".", 1)[0]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        found = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
    else:
        found = [a.name for a in node.names]
    return {t for t in found if t in mods and t != mod}


def import_graph():
    mods = _modules()
    graph = {}
    for mod, path in mods.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= _targets(mods, mod, node)
        # a submodule importing its own package's __init__ is not a cycle worth cutting
        graph[mod] = {t for t in edges if not mod.startswith(t + ".")}
    return graph


def find_cycle(graph):
    """One import cycle as a list of modules, or None."""
    state = {}
    stack = []

    def visit(mod):
        state[mod] = "open"
        stack.append(mod)
        for nxt in sorted(graph[mod]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[mod] = "done"
        return None

    for mod in sorted(graph):
        if mod not in state:
            cycle = visit(mod)
            if cycle:
                return cycle
    return None


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles_in_the_core():
    graph = import_graph()
    assert "diffueraser_core.schedule" in graph and "diffueraser_core.prior_injection" in graph
    assert find_cycle(graph) is None
    # the diffusion stages share their constants and the update step through the schedule module only
    assert "diffueraser_core.prior_injection" not in graph["diffueraser_core.temporal_sampling"]
    assert graph["diffueraser_core.schedule"] <= {"diffueraser_core.errors"}


def test_each_stage_module_imports_alone_in_a_fresh_interpreter():
    stages = ["schedule", "temporal_sampling", "prior_injection", "pre_inference", "pipeline", "prior_settings",
              "prior_chunks", "prior_propainter"]
    code = "; ".join(
        ["import importlib, sys"]
        + [
            f"[sys.modules.pop(m) for m in list(sys.modules) if m.startswith('{PACKAGE}')]; "
            f"importlib.import_module('{PACKAGE}.{name}')"
            for name in stages
        ]
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
