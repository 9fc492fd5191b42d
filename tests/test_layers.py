"""The import graph: every module imports only from its own layer or the layers below.

The layers, bottom up (docs/design.md, "Module map"); ``cli`` may import ``simulations``
(the runners it starts), nothing in ``fedse`` below the CLI may."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LAYERS: list[list[str]] = [
    ["fedse.config", "fedse.io", "fedse.interrupt"],
    ["fedse.models", "fedse.records", "fedse.identity", "fedse.per_sample"],
    ["fedse.split", "fedse.prior", "fedse.privacy"],
    ["fedse.data"],  # readers, transforms, partition, feature_skew, federated
    ["fedse.train", "fedse.state", "fedse.fingerprint"],
    ["fedse.policies"],
    ["fedse.personal"],
    ["fedse.analysis", "fedse.checkpoint", "fedse.rundir"],  # analysis: report, comparison
    ["fedse.federation"],  # client, strategy, server
    ["fedse.spec", "fedse.simulation", "fedse.deployment"],  # deployment: deploy, launch
    ["simulations.simulate", "simulations.compare", "simulations.monitor"],
    ["fedse.cli"],
]
APPS = ["clients.app", "server.app"]  # the Flower apps: thin, on top of the library, below nothing
LAYER = {module: i for i, layer in enumerate(LAYERS) for module in layer}


def _module_files() -> dict[str, Path]:
    """Every module, by dotted name; a subpackage (its ``__init__`` and its modules) is one layer's,
    under the subpackage's name (:func:`_layer`)."""
    files = {}
    for package in ("fedse", "simulations", "clients", "server"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if path.name == "__init__.py":
                if len(parts) == 2:  # a top-level package's own __init__
                    continue
                parts = parts[:-1]
            files[".".join(parts)] = path
    return files


def _layer(module: str) -> int | None:
    """The layer of ``module``, or of the subpackage it belongs to."""
    while module:
        if module in LAYER:
            return LAYER[module]
        module = module.rpartition(".")[0]
    return None


def _project_imports(module: str, path: Path) -> set[str]:
    """The project modules ``module`` imports (anywhere in the file, functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y / from . import x (a package's __init__ is its own base)
                package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
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
    assert {m for m in _FILES if _layer(m) is None} == set(APPS), "place the new module in LAYERS"
    assert set(LAYER) <= set(_FILES)


@pytest.mark.parametrize("module", sorted(m for m in _FILES if m not in APPS))
def test_imports_flow_down(module):
    mine = _layer(module)
    upward = {imp: _layer(imp) for imp in _project_imports(module, _FILES[module]) if (_layer(imp) or -1) > mine}
    assert not upward, f"{module} (layer {mine + 1}) imports from layers above it: {upward}"


@pytest.mark.parametrize("module", APPS)
def test_apps_are_thin_over_the_library(module):
    imports = _project_imports(module, _FILES[module])
    assert imports and all(imp.startswith("fedse.") for imp in imports)
    assert len(_FILES[module].read_text().splitlines()) < 120


def test_the_checker_sees_a_violation(tmp_path):
    # The graph check itself must be able to fail: an upward import is found.
    fake = tmp_path / "bad.py"
    fake.write_text("from .federation.server import run_server\n")
    assert _project_imports("fedse.models", fake) == {"fedse.federation.server"}


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
