"""The architecture as the imports show it: each layer imports only from the layers below it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]

# Lowest first; a module may import from its own layer and the layers before it. The ROS nodes
# sit above quantization (the calibration node quantizes), the simulator above the nodes (it
# evaluates through them), and the demo and the CLI on top.
LAYERS = [
    {"atomic", "errors", "outputs", "paths", "progress"},
    {"quantvla_kernels"},
    {"models"},
    {"engine"},
    {"quant"},
    {"loader", "data"},
    {"ros"},
    {"sim"},
    {"demo"},
    {"cli"},
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def package_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "quantvla_kernels":
        return "quantvla_kernels"
    return parts[1] if parts[0] == "quantvla_ros" and len(parts) > 1 else None


def imports() -> list[tuple[Path, str, str, str]]:
    """(file, its package, the package it imports, the module) for every import of this project's code."""
    found = []
    package = ROOT / "quantvla_ros"
    sources = [
        (f, "quantvla_ros." + ".".join(f.relative_to(package).with_suffix("").parts)) for f in package.rglob("*.py")
    ]
    sources += [(f, "quantvla_kernels") for f in (ROOT / "kernels").rglob("*.py")]
    for file, module in sources:
        own = package_of(module)
        for node in ast.walk(ast.parse(file.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                if name and (target := package_of(name)) is not None:
                    found.append((file.relative_to(ROOT), own, target, name))
    return found


def test_every_package_is_in_a_layer():
    packages = {p.stem for p in (ROOT / "quantvla_ros").iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    assert packages - {"__init__"} <= set(RANK), sorted(packages - set(RANK) - {"__init__"})


def test_no_layer_imports_from_a_layer_above_it():
    upward = [f"{file}: {own} imports {name}" for file, own, target, name in imports() if RANK[target] > RANK[own]]
    assert not upward, upward


def test_quantization_reads_calibration_data_through_the_models_protocol_only():
    assert not [name for _, own, target, name in imports() if own == "quant" and target == "data"]


def test_the_engine_knows_only_the_stage_interface():
    engine_imports = {name for _, own, target, name in imports() if own == "engine" and target == "models"}
    assert engine_imports == {"quantvla_ros.models.stages"}
