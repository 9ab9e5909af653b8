"""The agent's import graph: no cycles, and dependencies point downward
(docs/architecture.md). Read from the source with ``ast`` (TYPE_CHECKING imports
included), so a cycle is found before it breaks an import order."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# what each layer may import from vmagent (besides itself and the helpers)
HELPERS = {"vmagent", "vmagent.ops", "vmagent.spec", "vmagent.errors", "vmagent.context",
           "vmagent.rundir", "vmagent.fsutil", "vmagent.poll", "vmagent.jobs", "vmagent.faults"}
LAYERS = {
    "vmagent.qemu": set(),
    "vmagent.identity": set(),
    "vmagent.alloc": set(),
    "vmagent.images": {"vmagent.qemu", "vmagent.identity"},
    "vmagent.vms": {"vmagent.qemu", "vmagent.identity", "vmagent.images", "vmagent.alloc"},
    "vmagent.templates": {"vmagent.qemu", "vmagent.identity", "vmagent.images",
                          "vmagent.vms", "vmagent.alloc"},
    "vmagent.monitor": {"vmagent.qemu", "vmagent.identity", "vmagent.images",
                        "vmagent.vms", "vmagent.alloc"},
    "vmagent.pools": {"vmagent.qemu", "vmagent.identity", "vmagent.images", "vmagent.vms",
                      "vmagent.templates", "vmagent.alloc"},
    "vmagent.api": {"vmagent.qemu", "vmagent.identity", "vmagent.images", "vmagent.vms",
                    "vmagent.templates", "vmagent.alloc", "vmagent.monitor"},
}
# the pure parts of allocation are contract too: vmctl sizes and places requests with them
CONTRACT = {"vmagent.ops", "vmagent.spec", "vmagent.errors", "vmagent.context",
            "vmagent.alloc.sizing", "vmagent.alloc.placement"}


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    mod = _module(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = package.split(".")
                base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


@functools.lru_cache(maxsize=None)
def graph(package: str) -> dict[str, set[str]]:
    files = sorted((ROOT / package).rglob("*.py"))
    modules = {_module(f): f for f in files}
    return {m: {i for i in imports_of(f) if i in modules and i != m}
            for m, f in modules.items()}


def _cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_import_cycles_in_vmagent():
    assert _cycle(graph("vmagent")) is None, " -> ".join(_cycle(graph("vmagent")))


def test_no_import_cycles_in_vmctl():
    assert _cycle(graph("vmctl")) is None, " -> ".join(_cycle(graph("vmctl")))


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def _layer(mod: str) -> str | None:
    return next((layer for layer in LAYERS if mod == layer or mod.startswith(layer + ".")),
                None)


@pytest.mark.parametrize("module", sorted(graph("vmagent")))
def test_dependencies_point_downward(module):
    deps = graph("vmagent")[module]
    if module in CONTRACT:
        assert deps <= CONTRACT | {"vmagent"}, (module, deps - CONTRACT)
        return
    layer = _layer(module)
    if layer is None:
        return                  # app.py, cli.py and the helpers
    allowed = LAYERS[layer]
    for dep in deps:
        dep_layer = _layer(dep)
        assert dep in HELPERS or dep_layer == layer or dep_layer in allowed, \
            f"{module} imports {dep}"


def test_vmctl_uses_only_the_contract():
    for path in sorted((ROOT / "vmctl").rglob("*.py")):
        used = {i for i in imports_of(path) if i.startswith("vmagent")}
        allowed = CONTRACT | {"vmagent", "vmagent.__version__"} | {
            f"{c}.{name}" for c in CONTRACT for name in dir(__import__(c, fromlist=["x"]))}
        assert used <= allowed, (path, used - allowed)


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "bench").glob("*.py")))
def test_benchmarks_import_what_exists(script):
    """The benchmarks run only in the slow suite: a module they import that moved must
    fail here, in seconds (``from vmagent import seed`` after seed moved did once)."""
    import importlib

    tree = ast.parse((ROOT / "bench" / script).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vmagent"):
            mod = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(mod, alias.name) or importlib.util.find_spec(
                    f"{node.module}.{alias.name}"), f"{script}: {node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("vmagent"):
                    importlib.import_module(alias.name)
