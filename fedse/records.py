"""Flower records <-> torch state dicts, in one place, and the check of a reply.

Message layout (both directions):

* ``"arrays"``: :class:`ArrayRecord` of the *shared* keys only;
* ``"metrics"``: :class:`MetricRecord` (``num-examples`` plus the step's numbers);
* ``"config"`` (server -> client): the run's fedse configuration as JSON and the round;
* ``"client"`` (client -> server): a :class:`ConfigRecord` naming the client.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord

__all__ = ["check_arrays", "from_arrays", "to_arrays"]

ARRAYS, METRICS, CONFIG, CLIENT = "arrays", "metrics", "config", "client"
UNIT_WEIGHT = "unit-weight"  # client-level DP averages updates uniformly (its sensitivity analysis needs it)


def to_arrays(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """State dict (CPU copies of the given tensors) -> ArrayRecord, key order kept."""
    return ArrayRecord({k: v.detach().cpu() for k, v in state.items()})


def from_arrays(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return record.to_torch_state_dict()


def check_arrays(record: ArrayRecord, expected: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Reasons ``record`` is not a valid set of shared tensors; empty when it is.

    Valid means: exactly the expected keys (none missing, none extra, so no
    private key), each with the expected shape and only finite values.
    """
    problems = []
    keys = set(record.keys())
    if extra := sorted(keys - set(expected)):
        problems.append(f"keys outside the shared set: {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    if missing := sorted(set(expected) - keys):
        problems.append(f"missing shared keys: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for key in sorted(keys & set(expected)):
        array = record[key].numpy()
        if tuple(array.shape) != tuple(expected[key]):
            problems.append(f"{key}: shape {tuple(array.shape)}, expected {tuple(expected[key])}")
        elif not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
            problems.append(f"{key}: dtype {array.dtype} is not numeric")
        elif np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            problems.append(f"{key}: non-finite values (NaN or inf)")
    return problems
