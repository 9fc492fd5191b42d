"""The import graph: every module imports only from its own layer or the layers below.

The layers, bottom up (README, "Module map"); ``cli`` may import ``simulations``
(the runners it starts), nothing in ``fedse`` below the CLI may."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LAYERS: list[list[str]] = [
    ["fedse.config", "fedse.io", "fedse.interrupt"],
    ["fedse.models", "fedse.records", "fedse.identity"],
    ["fedse.split", "fedse.policies", "fedse.prior", "fedse.privacy"],
    ["fedse.data", "fedse.transforms", "fedse.partition", "fedse.feature_skew", "fedse.federated"],
    ["fedse.train", "fedse.local", "fedse.state", "fedse.personal", "fedse.fingerprint"],
    ["fedse.report", "fedse.checkpoint", "fedse.rundir", "fedse.comparison"],
    ["fedse.client", "fedse.strategy", "fedse.server"],
    ["fedse.simulation", "fedse.deploy", "fedse.launch"],
    ["simulations.simulate", "simulations.compare", "simulations.monitor"],
    ["fedse.cli"],
]
APPS = ["clients.app", "server.app"]  # the Flower apps: thin, on top of the library, below nothing
LAYER = {module: i for i, layer in enumerate(LAYERS) for module in layer}


def _module_files() -> dict[str, Path]:
    files = {}
    for package in ("fedse", "simulations", "clients", "server"):
        for path in sorted((ROOT / package).glob("*.py")):
            if path.name != "__init__.py":
                files[f"{package}.{path.stem}"] = path
    return files


def _project_imports(module: str, path: Path) -> set[str]:
    """The project modules ``module`` imports (anywhere in the file, functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y / from . import x
                base = module.rsplit(".", node.level)[0]
                target = f"{base}.{node.module}" if node.module else base
                names = [f"{target}.{a.name}" for a in node.names] if not node.module else [target]
            else:
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            found.update(n for n in names if n in _FILES)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in _FILES)
    return found - {module}


_FILES = _module_files()


def test_every_module_has_a_layer():
    assert set(_FILES) == set(LAYER) | set(APPS), "place the new module in LAYERS (and in the README's map)"


@pytest.mark.parametrize("module", sorted(LAYER))
def test_imports_flow_down(module):
    upward = {imp: LAYER[imp] for imp in _project_imports(module, _FILES[module]) if LAYER.get(imp, -1) > LAYER[module]}
    assert not upward, f"{module} (layer {LAYER[module] + 1}) imports from layers above it: {upward}"


@pytest.mark.parametrize("module", APPS)
def test_apps_are_thin_over_the_library(module):
    imports = _project_imports(module, _FILES[module])
    assert imports and all(imp.startswith("fedse.") for imp in imports)
    assert len(_FILES[module].read_text().splitlines()) < 120


def test_the_checker_sees_a_violation(tmp_path):
    # The graph check itself must be able to fail: an upward import is found.
    fake = tmp_path / "bad.py"
    fake.write_text("from .server import run_server\n")
    assert _project_imports("fedse.models", fake) == {"fedse.server"}


def test_models_and_the_training_loop_import_with_torch_alone():
    # A bare GPU machine (benchmarks/gpu.py's plain mode) has torch but no flwr, Opacus or PyYAML.
    import subprocess
    import sys

    code = (
        "import sys\n"
        "for name in ('flwr', 'opacus', 'yaml', 'ray'): sys.modules[name] = None\n"
        "import fedse.models, fedse.train\n"
        "m = fedse.models.create_model('se_resnet8', num_classes=10, in_channels=3, image_size=32)\n"
        "print(sum(p.numel() for p in m.parameters()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == 79_062  # se_resnet8 at CIFAR shape, as with every dependency
