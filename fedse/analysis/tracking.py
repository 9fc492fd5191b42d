"""A run in TensorBoard: every figure of the round line per round, the configuration and the final
tables per run, as event files in the run folder (``output.tensorboard: true``).

Point TensorBoard at the parent of the run folders (``tensorboard --logdir runs``) and every run with
the setting shows there, no glue: the scalars under ``accuracy/``, ``train/``, ``privacy/`` and
``replies/``, with the round as the step; the configuration and the per-client table as text. A
resumed run appends to its folder, its rounds numbered as the run's. The writer is
``torch.utils.tensorboard``, which needs the ``tensorboard`` package (``pip install fedse[tensorboard]``).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError, config_to_dict
from .report import (
    COL_DROPPED,
    COL_EPSILON,
    COL_FAILED,
    COL_LOCAL_ACC_MEAN,
    COL_LOCAL_ACC_WEIGHTED,
    COL_POOLED_ACC_MEAN,
    COL_REFUSED,
    COL_ROUND,
    COL_SECONDS,
    COL_TRAIN_ACC,
    COL_TRAIN_LOSS,
)

__all__ = ["EPSILON_TAGS", "TENSORBOARD_DIR", "SCALARS", "TensorBoardLog", "check_config"]

TENSORBOARD_DIR = "tensorboard"  # in the run folder
# The round line's figures, by their TensorBoard tag; the epsilon's tag is in EPSILON_TAGS.
SCALARS = {
    "accuracy/personalized_mean_over_clients": COL_LOCAL_ACC_MEAN,
    "accuracy/personalized_weighted_by_test_samples": COL_LOCAL_ACC_WEIGHTED,
    "accuracy/pooled_test_mean_over_clients": COL_POOLED_ACC_MEAN,
    "train/loss": COL_TRAIN_LOSS,
    "train/accuracy": COL_TRAIN_ACC,
    "replies/dropped": COL_DROPPED,
    "replies/failed": COL_FAILED,
    "replies/round_refused": COL_REFUSED,
    "time/round_seconds": COL_SECONDS,
}
# The epsilon spent so far, tagged with what it is by ``privacy.mode``: the server's client-level
# accountant, or the largest cumulative epsilon of the round's clients under sample-level DP-SGD.
# A board not told the mode tags it ``privacy/epsilon``.
EPSILON_TAGS = {
    "client": "privacy/epsilon_client_level",
    "sample": "privacy/epsilon_sample_level_max_over_clients",
}


def check_config(cfg: Config) -> None:
    """``output.tensorboard`` needs the tensorboard package, found before anything starts."""
    if cfg.output.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "config key 'output.tensorboard': true needs the package tensorboard, which is not installed here "
            "(pip install 'fedse[tensorboard]'); allowed: false"
        )


class TensorBoardLog:
    """The event files of one run folder; ``privacy``: the run's ``privacy.mode``, which names its
    epsilon (:data:`EPSILON_TAGS`)."""

    def __init__(self, run_dir: Path, privacy: str | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR))
        self.scalars = {**SCALARS, EPSILON_TAGS.get(privacy or "", "privacy/epsilon"): COL_EPSILON}

    def round(self, row: Mapping[str, Any]) -> None:
        """One row of the round table (:func:`fedse.analysis.report.round_rows`): every figure it has."""
        step = int(row[COL_ROUND])
        for tag, column in self.scalars.items():
            value = row.get(column)
            if isinstance(value, int | float):  # a figure the round measured (bools count 0/1)
                self.writer.add_scalar(tag, float(value), step)
        self.writer.flush()

    def run(self, cfg: Config, tables: Mapping[str, str]) -> None:
        """The configuration (JSON) and the final tables (Markdown), as text."""
        self.writer.add_text("config", "```\n" + json.dumps(config_to_dict(cfg), indent=1) + "\n```", 0)
        for name, text in tables.items():
            self.writer.add_text(name, text, 0)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
