"""The import contract: layers that go one way, and no cycle between packages.

``schemas/`` is the leaf; ``kafscribe/`` is the library and imports only
``schemas/`` (its ``cli/`` alone may import the packages above it);
``producers/`` and ``consumers/`` sit on the library and never import each
other; ``infra/`` is imported only by the CLI, the tests and the benchmarks.
Lazy imports inside functions count: they are imports all the same.

``make lint`` runs this file, so a back-up import fails before any test runs.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("schemas", "kafscribe", "producers", "consumers", "infra", "bench", "tests")

# Who may import whom, by top-level package (kafscribe.cli is its own row).
ALLOWED = {
    "schemas": set(),
    "kafscribe": {"schemas"},
    "kafscribe.cli": {"schemas", "kafscribe", "producers", "consumers", "infra"},
    "producers": {"schemas", "kafscribe"},
    "consumers": {"schemas", "kafscribe"},
    "infra": {"schemas", "kafscribe"},
    "bench": {"schemas", "kafscribe", "kafscribe.cli", "producers", "consumers", "infra"},
    "tests": {"schemas", "kafscribe", "kafscribe.cli", "producers", "consumers", "infra", "bench"},
}
ROOT_MODULE_LIMIT = 10  # modules directly in kafscribe/ (with __init__): the rest lives in subpackages


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute, lazy imports included."""
    mod = module_name(path)
    package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                prefix = package[: len(package) - node.level + 1]
                base = ".".join([*prefix, base] if base else prefix)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in PACKAGES}


def layer(module: str) -> str:
    return "kafscribe.cli" if module == "kafscribe.cli" or module.startswith("kafscribe.cli.") else module.split(".")[0]


def node(module: str) -> str:
    """The package a module counts for in the cycle check: a top-level package, or a subpackage of kafscribe.

    The modules directly in ``kafscribe/`` (settings, statuses, ...) are the base every subpackage stands
    on, so they are not a node of their own.
    """
    parts = module.split(".")
    if parts[0] == "kafscribe" and len(parts) > 2 and (ROOT / "kafscribe" / parts[1]).is_dir():
        return f"kafscribe.{parts[1]}"
    return parts[0]


def source_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if "__pycache__" not in p.parts)


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in source_files()}


def test_every_import_goes_down_a_layer() -> None:
    wrong = []
    for module, targets in graph().items():
        for target in targets:
            src, dst = layer(module), layer(target)
            if src != dst and dst not in ALLOWED[src]:
                wrong.append(f"{module} imports {target} ({src} may import only {sorted(ALLOWED[src])})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_cycle_between_packages() -> None:
    edges: dict[str, set[str]] = defaultdict(set)
    for module, targets in graph().items():
        for target in targets:
            if node(module) != node(target) and not (node(target) == "kafscribe" and module.startswith("kafscribe")):
                edges[node(module)].add(node(target))
    cycles = []
    for start in list(edges):
        stack = [(start, [start])]
        while stack:
            here, path = stack.pop()
            for nxt in edges.get(here, ()):
                if nxt == start:
                    cycles.append(" -> ".join([*path, nxt]))
                elif nxt not in path:
                    stack.append((nxt, [*path, nxt]))
    assert not cycles, "\n".join(sorted(set(cycles)))


def test_the_library_root_stays_small() -> None:
    root_modules = sorted(p.name for p in (ROOT / "kafscribe").glob("*.py"))
    assert len(root_modules) <= ROOT_MODULE_LIMIT, root_modules


def test_the_contract_sees_a_back_up_import(tmp_path: Path) -> None:
    """The checker itself: a library module that imports a consumer is reported."""
    fake = ROOT / "kafscribe" / "_layers_probe.py"
    fake.write_text("from consumers import loop\n")
    try:
        assert any(t.startswith("consumers") for t in imports_of(fake))
        assert layer(module_name(fake)) == "kafscribe" and "consumers" not in ALLOWED["kafscribe"]
    finally:
        fake.unlink()
