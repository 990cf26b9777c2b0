"""The package's layers: imports flow one way (bottom-up) and no import circle exists.

    silo.core                      base: configs, documents, licences, fingerprints, models, files, text
    silo.training, silo.datastore  each owns its on-disk formats; neither imports the other
    silo.model                     SiloLM, retrievers, sampling, attribution
    silo.workflows                 evaluation, tuning, the removal workflow
    silo.research                  the research harness
    silo.serving                   gRPC
    silo.cli                       the command line and the demo (top)

`silo.demo_corpus` is a tool that imports nothing of SILO; only `silo.cli` may import it. Every import
counts, also those inside functions (a lazy upward import is still an upward import). Functions stay
within ruff's complexity limits (C901, PLR0915; thresholds in pyproject.toml).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"silo": ROOT / "silo", "silo.training": ROOT / "training", "silo.datastore": ROOT / "datastore",
           "silo.serving": ROOT / "serving"}
LAYERS = {"silo.core": 0, "silo.training": 1, "silo.datastore": 1, "silo.demo_corpus": 1, "silo.model": 2,
          "silo.workflows": 3, "silo.research": 4, "silo.serving": 5, "silo.cli": 6}
ONLY_FROM_CLI = {"silo.demo_corpus"}


def modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            if pkg == "silo" and rel.parts[0] in ("training", "datastore", "serving"):
                continue
            if "gen" in rel.parts:  # generated gRPC code
                continue
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = path
    return out


def layer_of(module: str) -> str | None:
    return max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len, default=None)


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_pkg = path.name == "__init__.py"
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    out = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                stem = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            names = [f"{stem}.{a.name}" for a in node.names] + [stem]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports_of(m, p, known) for m, p in mods.items()}


def test_imports_flow_one_way():
    bad = []
    for mod, deps in graph().items():
        src = layer_of(mod)
        if src is None:
            continue
        for dep in deps:
            dst = layer_of(dep)
            if dst is None or dst == src:
                continue
            if dst in ONLY_FROM_CLI and src != "silo.cli":
                bad.append(f"{mod} -> {dep} (only the CLI may use {dst})")
            elif LAYERS[dst] >= LAYERS[src]:
                bad.append(f"{mod} ({src}) -> {dep} ({dst})")
    assert not bad, "upward or sideways imports:\n" + "\n".join(sorted(bad))


def test_no_import_circles():
    g = graph()
    seen, stack, cycles = set(), [], []

    def visit(m, on_path):
        if m in on_path:
            cycles.append(" -> ".join(stack[stack.index(m):] + [m]))
            return
        if m in seen:
            return
        seen.add(m)
        on_path.add(m)
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if d.startswith(m + "."):  # a package importing its own submodules is not a circle
                continue
            visit(d, on_path)
        stack.pop()
        on_path.discard(m)

    for m in sorted(g):
        visit(m, set())
    assert not cycles, "import circles:\n" + "\n".join(cycles)


COMPLEXITY_PATHS = ("silo", "training", "datastore", "serving", "benchmarks")  # serving/gen: pyproject excludes it


def test_functions_stay_readable():
    """No function past ruff's complexity limits (pyproject.toml [tool.ruff.lint]: McCabe complexity 12,
    50 statements). The limit is on functions, not files: a long file of small functions reads fine, and a
    file cap only moved code into shims."""
    run = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "C901,PLR0915", "--no-cache",
                          "--output-format", "concise", *COMPLEXITY_PATHS],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    found = [line for line in run.stdout.splitlines() if " C901 " in line or " PLR0915 " in line]
    assert run.returncode in (0, 1) and (run.returncode == 0 or found), f"ruff failed:\n{run.stdout}{run.stderr}"
    assert not found, "functions over the complexity limits (split them):\n" + "\n".join(sorted(found))


def test_the_checkout_root_is_not_part_of_the_package():
    """`silo` is the installed package: the layers resolve through the install's mapping, and nothing else
    of the checkout (tests/, benchmarks/, the root itself) can be imported as part of it."""
    import importlib.util

    for name in ("silo.training", "silo.datastore", "silo.serving"):
        assert importlib.util.find_spec(name) is not None, name
    for name in ("silo.tests", "silo.benchmarks", "silo.silo", "silo.scripts"):
        assert importlib.util.find_spec(name) is None, name
