"""Shared fixtures: a tiny federation config and Flower's task identity for hand-made Messages."""

import os
from pathlib import Path

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"  # tests send network traffic to loopback only

import pytest  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from fedse.config import config_from_dict  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def task_identity():
    """Messages created outside a Flower process need a run/node/task identity."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def flower_env(home, with_bin: bool = False) -> dict[str, str]:
    """The environment for Flower's own processes in a test: its home in ``home``, no telemetry, no
    runtime dependency installation; ``with_bin``: this interpreter's bin first on PATH (Flower starts
    its helpers by name)."""
    import sys

    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    if with_bin:
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return env


def cpu_state(model):
    """A copy of ``model``'s state on the host: training leaves a model on its device (CUDA when
    present), so a test compares against what it saved before on the host side."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def tiny_config(**sections):
    """Digits, 3 clients, a narrow se_resnet8: a federation that trains in a second."""
    raw = {
        "partition": {"num_clients": 3, "scheme": "dirichlet", "alpha": 1.0},
        "model": {"width": 8},
        "train": {"batch_size": 64},
        "server": {"rounds": 2},
        "evaluate": {"private_digest": True, "pooled_max_samples": 200},
    }
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return config_from_dict(raw)
