"""``fedse simulate``: one federated simulation from a configuration, or the rest of a stopped one.

A resumed run's checkpoint is checked against this run's model and DP ledger
before the simulation engine starts (:func:`fedse.server.check_resume`); a new
run reads its dataset and partition first, so a missing dataset leaves no run
folder, then :func:`fedse.simulation.simulate` claims the folder and runs.
"""

from __future__ import annotations

from pathlib import Path

from fedse import simulation
from fedse.config import Config
from fedse.federated import build_federated_data
from fedse.server import check_resume

__all__ = ["run"]


def run(
    cfg: Config, *, config_name: str, resume: Path | None = None, quiet: bool = False, verbose: bool = False
) -> simulation.SimulationResult:
    """Run ``cfg`` (or continue ``resume``, a run folder, from its checkpoint)."""
    fed = build_federated_data(cfg)
    if resume is not None:
        check_resume(resume, cfg, fed)
    return simulation.simulate(
        cfg, config_name=config_name, run_dir=resume, resume=resume is not None, quiet=quiet, verbose=verbose
    )
