"""Data: dataset readers (:mod:`.readers`, whose names this package also gives), per-batch transforms
(:mod:`.transforms`), partitions across clients (:mod:`.partition`), per-client feature skew
(:mod:`.feature_skew`), and the federation's per-client shards (:mod:`.federated`).

The readers load on first use (PEP 562), so ``fedse.data.transforms`` and the training loop import
with torch alone, as on a bare GPU machine."""

from typing import Any

_READERS = (
    "DATASETS",
    "Dataset",
    "DatasetError",
    "DatasetSpec",
    "IMAGE_SUFFIXES",
    "dataset_spec",
    "hflip",
    "load_dataset",
    "load_own",
    "read_images",
    "register_dataset",
)
__all__ = list(_READERS)


def __getattr__(name: str) -> Any:
    if name in _READERS:
        from . import readers

        return getattr(readers, name)
    raise AttributeError(f"module 'fedse.data' has no attribute {name!r}")
