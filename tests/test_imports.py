"""The import graph of ears_vllm (every module parsed, function-level imports included): no import circles, no
import from a lower layer to a higher one, and vLLM imported only where a module must talk to it.

The layers, lowest first (docs/vllm-seam.md: the seam is the only layer that knows vLLM's structures). A module
belongs to the most specific entry naming it or a package above it; a module no entry names fails the test, so a
new module is placed on purpose."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "ears_vllm"

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # What every layer may use: logging, the race keys' hash (pure integer arithmetic).
    ("foundation", ("ears_vllm._log", "ears_vllm.keys", "ears_vllm.tiny_models")),
    # Each policy's rule and its registry entry: tensors in, decisions out.
    ("policies", ("ears_vllm.policies",)),
    # What the kernels and the reference read: the config (settings resolved from the registry, the operator's
    # request limits), the budget's terms (BUDGETED_TOLERANCE), the typed step contract (one step in, its counts
    # out), and the reference verifier (its result type and placeholder the kernels share).
    (
        "terms",
        (
            "ears_vllm.config",
            "ears_vllm.control.limits",
            "ears_vllm.control.budget",
            "ears_vllm.step",
            "ears_vllm.reference",
        ),
    ),
    ("kernels", ("ears_vllm.kernels",)),
    # One verification step (verify), its counters and where the live ones are found, the models.
    ("core", ("ears_vllm", "ears_vllm.verify", "ears_vllm.stats", "ears_vllm.stats_registry", "ears_vllm.models")),
    # Per-request controls and the metrics endpoint: no vLLM structures.
    ("control", ("ears_vllm.control",)),
    # The only layer that maps vLLM's structures and patches vLLM.
    ("seam", ("ears_vllm.seam",)),
    # What vLLM or a user starts: the plugin's entry point, doctor, the command line, the benchmarks.
    ("entry", ("ears_vllm.plugin", "ears_vllm.doctor", "ears_vllm.cli", "ears_vllm.bench")),
)

# Modules outside the seam that import vLLM, and why they must.
VLLM_IMPORTERS = {
    "ears_vllm._log": "vLLM's logger, so the plugin's lines join vLLM's log stream with its format and level",
    "ears_vllm.cli": "`gpu-check bundle` copies the installed vLLM's own sources",
    "ears_vllm.doctor": "runs vLLM's own expand_batch_to_tokens as a worker would, to report whether it is broken",
    "ears_vllm.bench": "the benchmarks run vLLM's engine and time vLLM's own kernels beside ears-vllm's",
}


def module_files() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file, at any depth: intra-package ones resolved to the
    module imported (``from ears_vllm import kernels`` is ``ears_vllm.kernels``), others by their top name."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
            candidates = submodules if len(submodules) == len(node.names) else [base, *submodules]
        else:
            continue
        for imported in candidates:
            if imported.split(".")[0] != "ears_vllm":
                found.append((imported.split(".")[0], node.lineno))
                continue
            while imported not in modules:  # ``import ears_vllm.seam.patches as p`` and the like
                imported = imported.rpartition(".")[0]
            if imported != name:
                found.append((imported, node.lineno))
    return found


MODULES = module_files()
GRAPH = {name: imports_of(name, path, MODULES) for name, path in MODULES.items()}


def layer_of(name: str) -> int:
    best, level = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, level = len(prefix), index
    if level is None:
        pytest.fail(f"{name} is in no layer of tests/test_imports.py's LAYERS: place it")
    return level


def where(name: str, line: int) -> str:
    return f"{MODULES[name].relative_to(PACKAGE.parent)}:{line}"


def test_every_module_is_in_a_layer_and_imports_none_above_it():
    upward = []
    for name, imports in GRAPH.items():
        for imported, line in imports:
            if imported in MODULES and layer_of(imported) > layer_of(name):
                upward.append(
                    f"{where(name, line)} imports {imported}: "
                    f"{LAYERS[layer_of(name)][0]} -> {LAYERS[layer_of(imported)][0]}"
                )
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_no_import_circles():
    edges = {name: sorted({m for m, _ in imports if m in MODULES}) for name, imports in GRAPH.items()}
    lines = {(name, m): line for name, imports in GRAPH.items() for m, line in imports}
    circles, state = [], dict.fromkeys(edges, 0)  # 0 unvisited, 1 on the path, 2 done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for imported in edges[name]:
            if state[imported] == 1:
                circle = [*path[path.index(imported) :], name, imported]
                circles.append(" -> ".join(f"{a} ({where(a, lines[a, b])})" for a, b in itertools.pairwise(circle)))
            elif state[imported] == 0:
                visit(imported, [*path, name])
        state[name] = 2

    for name in edges:
        if state[name] == 0:
            visit(name, [])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_only_the_seam_imports_vllm_and_the_exceptions_say_why():
    outside = []
    for name, imports in GRAPH.items():
        allowed = name == "ears_vllm.seam" or name.startswith("ears_vllm.seam.")
        allowed = allowed or any(name == m or name.startswith(m + ".") for m in VLLM_IMPORTERS)
        outside += [f"{where(name, line)} imports vllm" for m, line in imports if m == "vllm" and not allowed]
    assert not outside, "vLLM imported outside the seam:\n" + "\n".join(outside)
    for name in VLLM_IMPORTERS:  # an exception that no longer imports vLLM is dropped from the list
        assert any(
            m == "vllm"
            for module, imports in GRAPH.items()
            if module == name or module.startswith(name + ".")
            for m, _ in imports
        ), f"{name} no longer imports vllm: drop it from VLLM_IMPORTERS"
