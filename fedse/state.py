"""Private client state: where the tensors that never leave a client live.

In simulation (and in a SuperNode's process) the state lives in Flower's
``context.state``, a RecordDict that the engine keeps per client across rounds.
A digest (CRC32 over keys, dtypes, shapes and bytes) identifies a state without
revealing it; it is used to verify continuity across rounds and restarts.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import torch
from flwr.app import Context

from .records import from_arrays, to_arrays

__all__ = ["PRIVATE_KEY", "digest", "load_private", "save_private"]

PRIVATE_KEY = "fedse.private"


def load_private(context: Context) -> dict[str, torch.Tensor] | None:
    """This client's private tensors from earlier rounds, or None on its first round."""
    if PRIVATE_KEY not in context.state.array_records:
        return None
    return from_arrays(context.state.array_records[PRIVATE_KEY])


def save_private(context: Context, state: Mapping[str, torch.Tensor]) -> None:
    context.state[PRIVATE_KEY] = to_arrays(state)


def digest(state: Mapping[str, torch.Tensor]) -> int:
    """CRC32 of the state's keys, dtypes, shapes and bytes (order-sensitive)."""
    crc = 0
    for key, tensor in state.items():
        t = tensor.detach().cpu().contiguous()
        crc = zlib.crc32(f"{key}|{t.dtype}|{tuple(t.shape)}".encode(), crc)
        crc = zlib.crc32(t.numpy().tobytes(), crc)
    return crc
