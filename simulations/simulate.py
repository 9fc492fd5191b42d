"""``fedse simulate``: one federated simulation from a configuration, or the rest of a stopped one.

A resumed run's checkpoint is checked against this run's model, DP ledger,
strategy and clients' private state before the simulation engine starts
(:func:`fedse.federation.server.check_resume`). A finished run is left as it is unless
``server.rounds`` asks for more. A new run reads its dataset and partition
first, so a missing dataset leaves no run folder, then
:func:`fedse.simulation.simulate` claims the folder and runs.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fedse import simulation
from fedse.config import Config
from fedse.data.federated import build_federated_data
from fedse.federation.server import check_resume
from fedse.state import PRIVATE_DIR

__all__ = ["run"]

log = logging.getLogger("fedse")


def run(
    cfg: Config, *, config_name: str, resume: Path | None = None, quiet: bool = False, verbose: bool = False
) -> simulation.SimulationResult | None:
    """Run ``cfg`` (or continue ``resume``, a run folder, from its checkpoint). None when ``resume``
    finished all of ``server.rounds`` already: nothing is run and nothing in it changes (said unless
    ``quiet``)."""
    fed = build_federated_data(cfg)
    if resume is not None:
        ckpt = check_resume(resume, cfg, fed, private_root=resume / PRIVATE_DIR)
        if ckpt is not None and ckpt.finished:
            if ckpt.round == cfg.server.rounds:
                if not quiet:
                    print(
                        f"{resume} finished all its {ckpt.round} rounds; nothing to add, nothing changed "
                        f"(to train on: fedse simulate --resume {resume} --set server.rounds=N, N > {ckpt.round})"
                    )
                return None
            log.warning("extending %s from %d to %d rounds", resume, ckpt.round, cfg.server.rounds)
    return simulation.simulate(
        cfg, config_name=config_name, run_dir=resume, resume=resume is not None, quiet=quiet, verbose=verbose
    )
