"""The package layers hold: imports flow one way and no module imports itself back through others.

Layers, bottom to top (README, "Architecture"):

    edgeft.core   errors, records, atomic files, progress, row reading, logit comparison
    runtime       load and run artifacts, bench them (core only)
    export        write artifacts and verify them (core, runtime)
    edgeft        training, merge, pipeline, CLI (anything below)

Imports are read with ``ast`` from the source, including those inside functions, so a lazy
import that goes the wrong way is caught too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("edgeft", "export", "runtime")

# What each layer may import, besides itself and third-party code.
ALLOWED = {
    "core": {"core", "root"},
    "runtime": {"core", "root", "runtime"},
    "export": {"core", "root", "runtime", "export"},
    "app": {"core", "root", "runtime", "export", "app"},
}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _layer(module: str) -> str:
    if module == "edgeft":
        return "root"  # edgeft/__init__.py: the version string, nothing else
    if module == "edgeft.core" or module.startswith("edgeft.core."):
        return "core"
    top = module.split(".")[0]
    return {"runtime": "runtime", "export": "export"}.get(top, "app")


def _imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Project modules that ``module`` imports anywhere in its source."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_pkg else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # "from pkg import sub" imports the submodule pkg.sub
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != module:
                out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {m: _imports(m, p, known) for m, p in known.items()}


def _wrong_way(graph: dict[str, set[str]]) -> list[str]:
    return [f"{m} ({_layer(m)}) imports {t} ({_layer(t)})"
            for m, targets in graph.items() for t in sorted(targets)
            if _layer(t) not in ALLOWED[_layer(m)]]


def test_imports_flow_one_way():
    wrong = _wrong_way(_graph())
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            # a package's __init__ importing its own submodules is how packages expose them
            if m != t and t.startswith(m + ".") and (ROOT / m.replace(".", "/") / "__init__.py").exists():
                continue
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (found := visit(t)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycles():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_catch_what_they_look_for():
    """The two checks above fail on a wrong-way import and on a circle (they can fail)."""
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    planted = {"runtime.bench": {"edgeft.train"}, "export.gguf": {"runtime.backends"}, "edgeft.core.records": {"export"}}
    assert _wrong_way(planted) == ["runtime.bench (runtime) imports edgeft.train (app)",
                                   "edgeft.core.records (core) imports export (export)"]
    # the graph really sees imports, lazy ones included
    graph = _graph()
    assert "edgeft.pipeline" in graph["edgeft.cli"]  # imported inside a command function
    assert any(t.startswith("edgeft.core") for targets in graph.values() for t in targets)


@pytest.mark.parametrize("layer", ["edgeft.core", "runtime"])
def test_foundation_and_runtime_import_without_heavy_packages(layer):
    """Importing every module of the foundation or the runtime pulls in no torch or transformers:
    the runtime's ONNX and GGUF paths run on a device with neither."""
    mods = sorted(m for m in _modules() if m == layer or m.startswith(layer + "."))
    code = ("import sys, importlib\n"
            f"for m in {mods!r}: importlib.import_module(m)\n"
            "heavy = sorted(h for h in ('torch', 'transformers', 'peft', 'bitsandbytes', 'optimum') if h in sys.modules)\n"
            "print(','.join(heavy))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{layer} imports {out.stdout.strip()} at import time"
