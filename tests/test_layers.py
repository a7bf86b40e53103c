"""The package's layers: every import, lazy ones included, points down (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).parents[1]
# Layer of each top-level unit: a unit may import its own modules and lower layers only.
LAYERS = {
    "errors": 0, "io": 0,
    "data": 1, "runtime": 1, "nets": 1,
    "prep": 2, "pretrain": 2, "evals": 2,
    "report": 3,
    "kube": 4,
    "cli": 5, "artifacts": 5, "export": 5,
    "components": 6,
    "pipelines": 7,
}  # fmt: skip
# The package root holds only the version and the image name; everything may import it.
ROOT = "ladder_siam"


def modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the library and its KFP shells."""
    found = {}
    for base, package in ((REPO / "src", None), (REPO, "components"), (REPO, "pipelines")):
        root = base / "ladder_siam" if package is None else base / package
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            prefix = ("ladder_siam",) if package is None else ("ladder_siam", package)
            name = ".".join(prefix + parts).removesuffix(".__init__")
            found[name] = path
    return found


def imports(path: Path) -> set[str]:
    """Every ``ladder_siam`` module ``path`` imports, at module level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(ROOT):
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith(ROOT))
    return names


def unit(module: str) -> str | None:
    """The layer unit of a dotted module name (None for the package root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_imports_point_down_and_same_layer_units_stay_apart() -> None:
    known = modules()
    violations = []
    for module, path in known.items():
        source = unit(module)
        if source is None:
            continue
        for target in imports(path) & set(known):
            destination = unit(target)
            if destination is None or destination == source:
                continue
            if LAYERS[destination] >= LAYERS[source]:
                violations.append(f"{module} imports {target}")
    assert violations == []


def test_every_unit_has_a_layer_and_the_top_level_stays_small() -> None:
    units = {unit(name) for name in modules()} - {None}
    assert units == set(LAYERS)
    top_level = [p for p in (REPO / "src" / "ladder_siam").glob("*.py") if p.name != "__init__.py"]
    assert len(top_level) <= 10, sorted(p.name for p in top_level)
