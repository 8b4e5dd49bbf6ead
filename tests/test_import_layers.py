"""The import graph of ``lever/``: no circle between modules, and no package importing a layer above it.

Every ``import`` / ``from ... import`` in every module counts, wherever it is written (module top,
inside a function, under ``if TYPE_CHECKING:``): a lazy import is still a dependency, it only runs
later.  Imports are read with ``ast``, so nothing is executed.
"""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

LEVER = Path(__file__).resolve().parents[1] / "lever"

#: bottom to top; a module may import its own layer and the ones below it.  The domain code
#: (between the foundations and the pipeline) is ordered package by package too, in the order its
#: work builds up: data, the models, the selector, sampling with the LVLM, RL on the samples,
#: training, then evaluation (inference, report); the stage functions above all of it, the pipeline
#: that builds their units above them.  ``obs`` (telemetry) and ``storage`` (the artifact store) use no domain package; ``lever.context``
#: (what a stage receives) is a foundation so that stages, report and pipeline all import it downward.
FOUNDATIONS = {"lever", "lever.errors", "lever.context", "lever.io", "lever.versioning", "lever.config", "lever.metrics"}
LAYERS: list[set[str]] = [
    FOUNDATIONS,
    {"lever.data", "lever.obs", "lever.storage"},
    {"lever.models"},
    {"lever.selectors"},
    {"lever.sampling"},
    {"lever.rl"},
    {"lever.training", "lever.validation"},
    {"lever.inference", "lever.report"},
    {"lever.stages"},
    {"lever.pipeline"},
    {"lever.platform", "lever.campaign", "lever.bench"},
    {"lever.cli", "lever.__main__"},
]

#: upward edges allowed (importer, imported) -> why; none are left.  A new one must be fixed, or
#: listed here with its reason.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in LEVER.rglob("*.py"):
        parts = list(path.relative_to(LEVER.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _targets(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """Dotted names an import statement may refer to (a submodule first, then its package)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    return [f"{source}.{a.name}" for a in node.names] + [source]


def import_graph() -> dict[str, set[str]]:
    """Module -> the lever modules it imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for module, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = _targets(node, module, path.name == "__init__.py")
            if isinstance(node, ast.ImportFrom):
                # ``from pkg import mod``: the submodule when it is one, else the package itself
                subs = [n for n in names[:-1] if n in mods]
                names = subs if subs else names[-1:]
            for name in names:
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                if name and name != module and name.startswith("lever"):
                    graph[module].add(name)
    return graph


def layer_of(module: str) -> int:
    parts = module.split(".")
    for key in (".".join(parts[:2]), parts[0]):
        for i, names in enumerate(LAYERS):
            if key in names:
                return i
    raise KeyError(f"{module}: in no layer (add its package to LAYERS)")


def test_the_graph_sees_lazy_and_type_only_imports():
    """The reader is the test's premise: a function-level import and a relative one are edges."""
    graph = import_graph()
    assert "lever.models.tiny_qwen" in graph["lever.models.factory"]  # inside build_lvlm
    assert "lever.errors" in graph["lever.context"]
    assert "lever.platform.pods" in graph["lever.platform.workflows"]  # ``from lever.platform import pods``


def test_no_import_circle():
    try:
        TopologicalSorter(import_graph()).prepare()
    except CycleError as exc:
        pytest.fail(f"import circle: {' -> '.join(exc.args[1])}")


def test_every_package_has_a_layer():
    for module in import_graph():
        layer_of(module)


def test_no_upward_import_beyond_the_allow_list():
    graph = import_graph()
    upward = {(a, b) for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a)}
    unexpected = sorted(upward - set(ALLOWED_UPWARD))
    assert not unexpected, "imports from a lower layer into a higher one:\n" + "\n".join(f"  {a} -> {b}" for a, b in unexpected)
    stale = sorted(set(ALLOWED_UPWARD) - upward)
    assert not stale, f"allow-list entries no longer needed (remove them): {stale}"
