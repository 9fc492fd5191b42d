"""One checked description of a run: every registry checks its own part of a configuration.

:func:`fedse.config.load_config` checks types, ranges and the rules between plain numbers; what a
name means belongs to the registry that holds it. :func:`resolve` asks each in turn (the dataset,
the partition and feature skew, the model, privacy, the strategy, the policy) and returns the
:class:`RunSpec` the run is made of. Every command that starts a run calls it before anything
starts, so a bad name or combination is one error naming the key, the value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import models, privacy
from .analysis import tracking
from .config import Config
from .data import partition, readers
from .data.federated import model_shape
from .federation import strategy
from .policies import Policy
from .policies import resolve as resolve_policy

__all__ = ["RunSpec", "resolve"]


@dataclass(frozen=True)
class RunSpec:
    """A run's configuration, checked, with what its names resolve to."""

    cfg: Config
    dataset: readers.DatasetSpec
    policy: Policy  # resolved: the config's settings applied (fedse.policies.resolve)


def resolve(cfg: Config, policy: str | None = None) -> RunSpec:
    """``cfg`` checked by every registry (``policy``: another policy than the config's, as a
    comparison runs each method); a ConfigError names the first problem."""
    dataset = readers.check_config(cfg.data)
    partition.check_config(cfg.partition)
    models.check_config(cfg.model)
    try:
        size = model_shape(cfg)[2]
    except ValueError:  # an image folder whose shape the config does not give: the clients' data gives it
        size = None
    if size is not None:
        models.check_shape(cfg.model, size)
    privacy.check_config(cfg)
    strategy.check_config(cfg)
    tracking.check_config(cfg)
    return RunSpec(cfg, dataset, resolve_policy(cfg, policy))
