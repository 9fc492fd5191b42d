"""A dataset split across virtual clients: the one place config turns into shards.

``config -> load dataset -> partition (seeded) -> each client's own train/test
split (same label distribution) -> each client's fixed feature style``; a split
imported from files (``partition.scheme: file``, :mod:`.split_import`) gives the
dataset and every client's train and test part as they are. Every
process (the simulation driver, each Ray actor, a test) that builds it from
the same configuration gets the same shards, so nothing but the configuration
travels between them. Results are cached per process.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from ..config import Config
from .feature_skew import ClientStyle, apply_style, make_client_styles
from .partition import label_counts, partition_from_config, split_train_test
from .readers import Dataset, dataset_spec, load_dataset, load_own
from .split_import import SPLIT_SCHEME, SplitInfo, import_split

__all__ = ["ClientShard", "FederatedData", "build_federated_data", "model_shape", "own_data"]


@dataclass(frozen=True)
class ClientShard:
    client_id: int
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


@dataclass(frozen=True)
class FederatedData:
    dataset: Dataset
    train_parts: tuple[np.ndarray, ...]
    test_parts: tuple[np.ndarray, ...]
    styles: tuple[ClientStyle, ...] | None
    split: SplitInfo | None = None  # the imported split it was built from (partition.scheme: file)

    @property
    def num_clients(self) -> int:
        return len(self.train_parts)

    def _take(self, client: int, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.from_numpy(index)
        images = self.dataset.images[idx]
        if self.styles is not None:
            images = apply_style(images, self.styles[client])
        return images, self.dataset.labels[idx]

    def shard(self, client: int) -> ClientShard:
        if not 0 <= client < self.num_clients:
            raise ValueError(f"client id {client} out of range; this federation has clients 0..{self.num_clients - 1}")
        return ClientShard(
            client, *self._take(client, self.train_parts[client]), *self._take(client, self.test_parts[client])
        )

    def pooled_test(self, max_samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Union of every client's test part (each in its own feature style), cut to
        ``max_samples`` by taking the same share from every client (seeded)."""
        total = sum(len(p) for p in self.test_parts)
        share = min(1.0, max_samples / max(total, 1))
        rng = np.random.default_rng(seed)
        images, labels = [], []
        for client, part in enumerate(self.test_parts):
            keep = np.sort(rng.permutation(part)[: int(round(len(part) * share))])
            x, y = self._take(client, keep)
            images.append(x)
            labels.append(y)
        return torch.cat(images), torch.cat(labels)

    def label_counts(self, which: str = "all") -> np.ndarray:
        """(clients x classes) sample counts of the train, test or both parts."""
        parts = {
            "train": self.train_parts,
            "test": self.test_parts,
            "all": tuple(np.concatenate(p) for p in zip(self.train_parts, self.test_parts, strict=True)),
        }[which]
        return label_counts(self.dataset.labels.numpy(), list(parts), self.dataset.num_classes)


def _key(cfg: Config) -> tuple:
    return (cfg.seed, cfg.data.dataset, cfg.data.root, cfg.data.download, cfg.data.classes, cfg.partition)


def model_shape(cfg: Config, dataset: Dataset | None = None) -> tuple[int, int, int]:
    """(classes, channels, image size) of the run's model: ``model.num_classes``, ``in_channels`` and
    ``image_size`` where set, else what ``data.dataset`` implies (``len(data.classes)`` classes for
    imagefolder). No data is read: a deployed server builds its model from this alone. With
    ``dataset`` (a client's data, or the simulator's), the data must have that shape."""
    m, d = cfg.model, cfg.data
    spec = dataset_spec(d.dataset)
    classes, channels, size = spec.classes or d.classes, spec.channels, spec.image_size
    shape = (m.num_classes or len(d.classes or classes) or None, m.in_channels or channels, m.image_size or size)
    if dataset is not None:
        have = (dataset.num_classes, dataset.channels, dataset.image_size)
        shape = tuple(s if s is not None else h for s, h in zip(shape, have, strict=True))
        if shape != have:
            raise ValueError(
                f"the data has {have[0]} classes, {have[1]} channels, {have[2]}x{have[2]} images, "
                f"but the run's model expects {shape[0]}, {shape[1]}, {shape[2]}x{shape[2]} "
                "(model.num_classes, model.in_channels, model.image_size, data.classes)"
            )
    if None in shape:
        raise ValueError(
            f"dataset {d.dataset!r} implies no model shape: set model.num_classes (or data.classes), "
            "model.in_channels and model.image_size"
        )
    return shape  # type: ignore[return-value]


@functools.lru_cache(maxsize=4)
def _build(key: tuple) -> FederatedData:
    seed, name, root, download, classes, p = key
    split = None
    if p.scheme == SPLIT_SCHEME:
        imported = import_split(p, name, root=root, download=download, classes=classes)
        dataset, train, test, split = imported.dataset, imported.train, imported.test, imported.info
    else:
        dataset = load_dataset(name, root=root, download=download, classes=classes)
        labels = dataset.labels.numpy()
        parts = partition_from_config(labels, p, seed=seed)
        train, test = split_train_test(parts, labels, test_fraction=p.test_fraction, seed=seed)
    styles = None
    if p.feature_skew:
        styles = tuple(
            make_client_styles(p.num_clients, kinds=p.feature_skew, strength=p.feature_skew_strength, seed=seed)
        )
    return FederatedData(dataset, tuple(train), tuple(test), styles, split)


def build_federated_data(cfg: Config) -> FederatedData:
    """The federation described by ``cfg`` (cached: same config, same object)."""
    return _build(_key(cfg))


@functools.lru_cache(maxsize=4)
def _own(seed: int, name: str, data_dir: str, test_fraction: float, classes: tuple[str, ...]) -> FederatedData:
    dataset = load_own(name, data_dir, classes=classes)
    everything = np.arange(len(dataset.labels))
    train, test = split_train_test([everything], dataset.labels.numpy(), test_fraction=test_fraction, seed=seed)
    return FederatedData(dataset, tuple(train), tuple(test), None)


def own_data(cfg: Config, data_dir: str) -> FederatedData:
    """A deployed client's own data: every sample of ``cfg.data.dataset`` read from ``data_dir`` and
    nowhere else (:func:`fedse.data.readers.load_own`; its formats:
    :attr:`fedse.data.readers.DatasetSpec.own_format`), split into its train and test part
    (``test_fraction``, stratified, seeded); a one-client federation, so ``shard(0)`` is the client's."""
    return _own(cfg.seed, cfg.data.dataset, str(data_dir), cfg.partition.test_fraction, cfg.data.classes)
