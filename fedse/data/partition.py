"""Non-IID partitioners: seeded pure functions of (labels, clients, parameters, seed).

* ``iid``: a seeded shuffle cut into equal parts.
* ``dirichlet``: label skew, Hsu, Qi, Brown 2019 (arXiv:1909.06335): each
  class is split across clients with proportions drawn from Dirichlet(alpha);
  the whole draw is repeated until every client holds ``min_size`` samples.
  (The global form, as Flower Datasets' ``DirichletPartitioner``; at hundreds
  of clients and more the redraw rarely meets ``min_size``.)
* ``dirichlet-client``: label skew in the per-client form, Acar et al. 2021
  (FedDyn; FedLab's ``client_inner_dirichlet_partition``): each client draws
  its own label proportions from Dirichlet(alpha) and its own size (at least
  ``min_size``, log-normal spread ``size_sigma``), then samples without
  replacement. Meets ``min_size`` by construction, at any number of clients.
* ``pathological``: ``k`` classes per client, McMahan et al. 2017 (shards).
* ``quantity``: client sizes from Dirichlet(alpha), labels IID within a client
  (NIID-Bench, Li et al. 2022).

Feature skew, which transforms images rather than splitting indices, is
:mod:`fedse.data.feature_skew`. A split made elsewhere and read from files (``partition.scheme: file``)
is :mod:`fedse.data.split_import`.

Each returns one sorted int64 index array per client; the arrays are disjoint
and cover every sample (except ``dirichlet-client`` with ``samples_per_client``,
which leaves the rest out). Every function owns its ``np.random.default_rng(seed)``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..config import ConfigError, PartitionConfig, choice_error, short_repr
from ..io import atomic_save

__all__ = [
    "partition_from_config",
    "FILE_SCHEME",
    "PARTITIONERS",
    "PartitionError",
    "create_partition",
    "dirichlet",
    "dirichlet_per_client",
    "iid",
    "label_counts",
    "pathological",
    "plot_label_counts",
    "quantity_skew",
    "split_train_test",
]


class PartitionError(ValueError):
    """The requested partition cannot be made; the message says what to change."""


def _finish(parts: list[list[int]] | list[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _check_clients(labels: np.ndarray, num_clients: int, min_size: int) -> None:
    if num_clients < 1:
        raise PartitionError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients * min_size > len(labels):
        raise PartitionError(
            f"{num_clients} clients x min_size {min_size} = {num_clients * min_size} samples needed, "
            f"but the dataset has {len(labels)}; use fewer clients or a smaller min_size"
        )


def iid(labels: np.ndarray, num_clients: int, *, seed: int, min_size: int = 1) -> list[np.ndarray]:
    """Uniformly random, equal-sized parts (sizes differ by at most one)."""
    labels = np.asarray(labels)
    _check_clients(labels, num_clients, min_size)
    rng = np.random.default_rng(seed)
    return _finish(np.array_split(rng.permutation(len(labels)), num_clients))


def _owners(count: int, proportions: np.ndarray) -> np.ndarray:
    """The client of each of ``count`` shuffled samples cut by ``proportions`` (cut ``i`` at
    ``floor(cumsum(proportions)[i] * count)``), as one array: no per-client loop."""
    cuts = np.clip((np.cumsum(proportions)[:-1] * count).astype(np.int64), 0, count)
    return np.repeat(np.arange(len(proportions)), np.diff(cuts, prepend=0, append=count))


def _group(index: np.ndarray, owner: np.ndarray, num_clients: int) -> list[np.ndarray]:
    """One sorted int64 array per client from (sample index, its client) pairs."""
    ranked = np.lexsort((index, owner))
    sizes = np.bincount(owner, minlength=num_clients)
    return np.split(index[ranked].astype(np.int64), np.cumsum(sizes)[:-1])


def _redraw(
    draw: Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray]],
    rng: np.random.Generator,
    *,
    scheme: str,
    alpha: float,
    num_clients: int,
    min_size: int,
    max_retries: int,
    alternative: str = "",
) -> list[np.ndarray]:
    """Repeat a whole seeded draw of (sample index, its client) pairs until every client holds
    ``min_size`` samples (bounded); a draw is checked by its sizes alone and grouped only once."""
    smallest = 0
    for _ in range(max_retries):
        index, owner = draw(rng)
        smallest = int(np.bincount(owner, minlength=num_clients).min())
        if smallest >= min_size:
            return _group(index, owner, num_clients)
    raise PartitionError(
        f"{scheme}(alpha={alpha}) over {num_clients} clients: after {max_retries} retries the smallest "
        f"client still had {smallest} < min_size={min_size} samples; use a larger alpha, fewer clients "
        f"or a smaller min_size{alternative}"
    )


def dirichlet(
    labels: np.ndarray, num_clients: int, *, alpha: float, seed: int, min_size: int = 10, max_retries: int = 100
) -> list[np.ndarray]:
    """Label skew: every class split across clients by Dirichlet(alpha) proportions."""
    labels = np.asarray(labels)
    if alpha <= 0:
        raise PartitionError(f"dirichlet alpha must be > 0, got {alpha}")
    _check_clients(labels, num_clients, min_size)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]

    def draw(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        pieces, owners = [], []
        for members in by_class:
            pieces.append(rng.permutation(members))
            owners.append(_owners(len(members), rng.dirichlet(np.full(num_clients, alpha))))
        return np.concatenate(pieces), np.concatenate(owners)

    return _redraw(
        draw,
        np.random.default_rng(seed),
        scheme="dirichlet",
        alpha=alpha,
        num_clients=num_clients,
        min_size=min_size,
        max_retries=max_retries,
        alternative=(
            ", or scheme 'dirichlet-client' (each client draws its own label proportions and size: "
            "min_size is met at any number of clients)"
        ),
    )


def _client_sizes(total: int, num_clients: int, min_size: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """``min_size`` each plus a share of the rest by log-normal(0, sigma) weights, rounded so the
    sizes sum to ``total`` exactly (cumulative rounding: each size within one of its share)."""
    rest = total - num_clients * min_size
    log_w = sigma * rng.standard_normal(num_clients)
    w = np.exp(log_w - log_w.max())  # in log space: no overflow for any sigma
    cuts = np.floor(np.cumsum(w) / w.sum() * rest + 0.5).astype(np.int64)
    cuts = np.minimum(cuts, rest)
    cuts[-1] = rest
    return min_size + np.diff(cuts, prepend=0)


def dirichlet_per_client(
    labels: np.ndarray,
    num_clients: int,
    *,
    alpha: float,
    seed: int,
    min_size: int = 10,
    size_sigma: float = 0.0,
    samples_per_client: int = 0,
) -> list[np.ndarray]:
    """Label skew, per-client form (Acar et al. 2021, FedDyn, arXiv:2111.04263; FedLab's
    ``client_inner_dirichlet_partition``): client ``k`` draws its label proportions
    ``p_k ~ Dirichlet(alpha * 1_C)`` over the ``C`` classes and its size ``n_k``, then takes ``n_k``
    samples without replacement, each of class ``c`` with probability ``p_k[c]``; once a class has
    run out, ``p_k`` is renormalised over the classes left. (Hsu et al. 2019 draw the proportions the
    same way but write ``Dirichlet(alpha' * prior)``: with a uniform prior their ``alpha'`` is this
    ``alpha * C``.)

    Sizes: ``min_size`` each plus a share of the remaining samples in proportion to log-normal
    weights ``exp(size_sigma * z)``, ``z ~ N(0, 1)`` (FedDyn's unbalanced setting, where 0.3 is
    usual); ``size_sigma=0`` gives equal sizes (differing by at most one). The sizes are scaled to
    the dataset, so, unlike the per-client form with sizes drawn freely, the parts are disjoint *and
    cover every sample*, and ``min_size`` holds by construction: no redraws, at any scale. The price
    of covering: the draws made after a class has run out follow the renormalised proportions, so
    the clients' label mix is somewhat less skewed than their ``p_k``; the gap is largest with few
    clients (where the class totals the clients ask for differ most from the data's), for which the
    global ``dirichlet`` fits the data better.

    Vectorised, no per-sample loop: every client's class counts are drawn at once (multinomial);
    a class asked for more than it holds is granted to a uniformly random subset of the requests
    (multivariate hypergeometric over clients) and the unmet requests are drawn again over the
    classes left, with each client's ``p_k`` renormalised; every round empties at least one class,
    so there are at most ``C`` rounds. A client with no mass left on any remaining class (possible
    for tiny ``alpha``) draws in proportion to what is left."""
    labels = np.asarray(labels)
    if not (alpha > 0 and math.isfinite(alpha)):
        raise PartitionError(f"dirichlet-client alpha must be a finite number > 0, got {alpha}")
    if not (size_sigma >= 0 and math.isfinite(size_sigma)):
        raise PartitionError(f"dirichlet-client size_sigma must be a finite number >= 0, got {size_sigma}")
    if min_size < 0:
        raise PartitionError(f"min_size must be >= 0, got {min_size}")
    _check_clients(labels, num_clients, min_size)
    total = len(labels)
    if samples_per_client:
        if samples_per_client < max(min_size, 1):
            raise PartitionError(
                f"samples_per_client={samples_per_client} is below min_size={min_size}; "
                "use samples_per_client >= min_size (or 0 to share the whole dataset)"
            )
        total = num_clients * samples_per_client
        if total > len(labels):
            raise PartitionError(
                f"{num_clients} clients x samples_per_client {samples_per_client} = {total} samples, "
                f"but the dataset has {len(labels)}; use at most {len(labels) // num_clients} per client "
                "or fewer clients"
            )
    rng = np.random.default_rng(seed)
    classes, codes = np.unique(labels, return_inverse=True)
    codes = codes.ravel()
    num_classes = len(classes)
    supply = np.bincount(codes, minlength=num_classes).astype(np.int64)
    sizes = _client_sizes(total, num_clients, min_size, size_sigma, rng)
    props = rng.dirichlet(np.full(num_classes, alpha), size=num_clients)

    granted = np.zeros((num_clients, num_classes), dtype=np.int64)
    wanted = rng.multinomial(sizes, props)
    for _ in range(num_classes + 1):
        asked = wanted.sum(0)
        over = asked > supply
        granted[:, ~over] += wanted[:, ~over]
        supply[~over] -= asked[~over]
        if not over.any():
            break
        unmet = np.zeros(num_clients, dtype=np.int64)
        for c in np.flatnonzero(over):
            got = rng.multivariate_hypergeometric(wanted[:, c], supply[c])
            granted[:, c] += got
            unmet += wanted[:, c] - got
            supply[c] = 0
        left = props * (supply > 0)
        mass = left.sum(1, keepdims=True)
        stuck = mass[:, 0] <= 0
        left[stuck] = supply / supply.sum()
        mass[stuck] = 1.0
        wanted = rng.multinomial(unmet, left / mass)
    else:  # unreachable: every round empties a class and the sizes sum to the supply
        raise AssertionError("dirichlet-client: requests outlived the classes")

    # Each class's indices in a seeded random order, dealt to its clients in client order.
    order = rng.permutation(len(labels))
    order = order[np.argsort(codes[order], kind="stable")]
    deal = np.concatenate([granted.T, supply[:, None]], axis=1).ravel()  # per class: clients, then unassigned
    owner = np.repeat(np.tile(np.append(np.arange(num_clients), -1), num_classes), deal)
    mine = owner >= 0
    return _group(order[mine], owner[mine], num_clients)


def quantity_skew(
    labels: np.ndarray, num_clients: int, *, alpha: float, seed: int, min_size: int = 10, max_retries: int = 100
) -> list[np.ndarray]:
    """Quantity skew: client sizes by Dirichlet(alpha); labels IID within a client."""
    labels = np.asarray(labels)
    if alpha <= 0:
        raise PartitionError(f"quantity alpha must be > 0, got {alpha}")
    _check_clients(labels, num_clients, min_size)

    def draw(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return rng.permutation(len(labels)), _owners(len(labels), rng.dirichlet(np.full(num_clients, alpha)))

    return _redraw(
        draw,
        np.random.default_rng(seed),
        scheme="quantity",
        alpha=alpha,
        num_clients=num_clients,
        min_size=min_size,
        max_retries=max_retries,
    )


def pathological(
    labels: np.ndarray, num_clients: int, *, classes_per_client: int, seed: int, min_size: int = 1
) -> list[np.ndarray]:
    """Each client holds exactly ``classes_per_client`` classes; each class is split evenly
    among the clients holding it; classes are dealt round-robin after a seeded shuffle."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    k = classes_per_client
    if not 1 <= k <= len(classes):
        raise PartitionError(f"classes_per_client must be in [1, {len(classes)}] (the number of classes), got {k}")
    if num_clients * k < len(classes):
        raise PartitionError(
            f"{num_clients} clients x {k} classes each = {num_clients * k} slots < {len(classes)} classes: "
            "some class would belong to no client; raise classes_per_client or num_clients"
        )
    _check_clients(labels, num_clients, min_size)
    rng = np.random.default_rng(seed)
    order = rng.permutation(classes)
    owners: dict[int, list[int]] = {int(c): [] for c in classes}
    for client in range(num_clients):
        for j in range(k):
            owners[int(order[(client * k + j) % len(classes)])].append(client)
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for c, holders in owners.items():
        index = rng.permutation(np.flatnonzero(labels == c))
        for client, chunk in zip(holders, np.array_split(index, len(holders)), strict=True):
            parts[client].extend(chunk.tolist())
    smallest = min(len(p) for p in parts)
    if smallest < min_size:
        raise PartitionError(
            f"pathological split left a client with {smallest} < min_size={min_size} samples; use fewer clients"
        )
    return _finish(parts)


PARTITIONERS: dict[str, Callable[..., list[np.ndarray]]] = {
    "iid": iid,
    "dirichlet": dirichlet,
    "dirichlet-client": dirichlet_per_client,
    "pathological": pathological,
    "quantity": quantity_skew,
}


FILE_SCHEME = "file"  # a split read from files (fedse.data.split_import), not drawn by a partitioner
_SHA256 = frozenset("0123456789abcdef")


def check_config(p: PartitionConfig) -> None:
    """``partition.scheme`` and ``partition.feature_skew`` are registered names, the keys only
    ``dirichlet-client`` reads keep their defaults under another scheme, and those of an imported
    split (``split``, ``split_sha256``) are set under ``file`` alone, where ``test_fraction`` does not apply."""
    from .feature_skew import STYLE_KINDS

    if p.scheme not in PARTITIONERS and p.scheme != FILE_SCHEME:
        raise choice_error("partition.scheme", p.scheme, [*PARTITIONERS, FILE_SCHEME])
    _check_file_keys(p)
    for i, kind in enumerate(p.feature_skew):
        if kind not in STYLE_KINDS:
            raise choice_error(f"partition.feature_skew[{i}]", kind, STYLE_KINDS)
    for key, default in (("size_sigma", 0.0), ("samples_per_client", 0)):
        if p.scheme != "dirichlet-client" and getattr(p, key) != default:
            raise ConfigError(
                f"config key 'partition.{key}': {short_repr(getattr(p, key))} is only used by partition.scheme="
                f"dirichlet-client (got scheme {p.scheme!r}); allowed: {default} with this scheme"
            )


def _check_file_keys(p: PartitionConfig) -> None:
    if p.scheme == FILE_SCHEME:
        if not p.split:
            raise ConfigError(
                f"config key 'partition.split': {short_repr(p.split)}, but partition.scheme={FILE_SCHEME} reads "
                "the split from it; allowed: the path of a PFLlib dataset folder or of a .json or .npz index file "
                "(docs/data.md#bring-your-own-split)"
            )
        if p.test_fraction != 0.25:
            raise ConfigError(
                f"config key 'partition.test_fraction': {short_repr(p.test_fraction)}, but under partition.scheme="
                f"{FILE_SCHEME} every client's train and test part is the split file's; allowed: 0.25 (the default)"
            )
    else:
        for key in ("split", "split_sha256"):
            if getattr(p, key) is not None:
                raise ConfigError(
                    f"config key 'partition.{key}': {short_repr(getattr(p, key))} is only used by partition.scheme="
                    f"{FILE_SCHEME} (got scheme {p.scheme!r}); allowed: null with this scheme"
                )
    digest = p.split_sha256
    if digest is not None and (len(digest) != 64 or not set(digest) <= _SHA256):
        raise ConfigError(
            f"config key 'partition.split_sha256': {short_repr(digest)}; allowed: 64 lowercase hexadecimal digits "
            "(a SHA-256, as a run records it) or null"
        )


def create_partition(name: str, labels: np.ndarray, num_clients: int, *, seed: int, **params) -> list[np.ndarray]:
    if name not in PARTITIONERS:
        raise ValueError(f"unknown partition scheme {name!r}; valid schemes: {sorted(PARTITIONERS)}")
    fn = PARTITIONERS[name]
    accepted = [p for p in inspect.signature(fn).parameters if p not in ("labels", "num_clients", "seed")]
    if unknown := sorted(set(params) - set(accepted)):
        raise ValueError(f"partition scheme {name!r} takes {accepted}, not {unknown}")
    return fn(labels, num_clients, seed=seed, **params)


def partition_from_config(labels: np.ndarray, p: PartitionConfig, *, seed: int) -> list[np.ndarray]:
    """``create_partition(p.scheme, ...)`` with every parameter the scheme takes that is a config
    field (``alpha``, ``min_size``, ``classes_per_client``, ``size_sigma``,
    ``samples_per_client``) read from that field."""
    if p.scheme not in PARTITIONERS:
        raise ValueError(f"unknown partition scheme {p.scheme!r}; valid schemes: {sorted(PARTITIONERS)}")
    fields = {f.name for f in dataclasses.fields(p)} - {"scheme", "num_clients"}
    taken = [n for n in inspect.signature(PARTITIONERS[p.scheme]).parameters if n in fields]
    return create_partition(p.scheme, labels, p.num_clients, seed=seed, **{n: getattr(p, n) for n in taken})


def split_train_test(
    parts: Sequence[np.ndarray], labels: np.ndarray, *, test_fraction: float = 0.25, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Split every client's indices into its own train and test part, stratified by class:
    ``round(n_c * test_fraction)`` of each class go to test, keeping at least one sample of
    a class with two or more on each side."""
    if not 0 < test_fraction < 1:
        raise PartitionError(f"test_fraction must be in (0, 1), got {test_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for part in parts:
        part = np.asarray(part)
        tr, te = [], []
        for c in np.unique(labels[part]):
            index = rng.permutation(part[labels[part] == c])
            n_test = int(math.floor(len(index) * test_fraction + 0.5))
            if len(index) >= 2:
                n_test = min(max(n_test, 1), len(index) - 1)
            te.append(index[:n_test])
            tr.append(index[n_test:])
        train.append(np.sort(np.concatenate(tr)).astype(np.int64) if tr else np.empty(0, np.int64))
        test.append(np.sort(np.concatenate(te)).astype(np.int64) if te else np.empty(0, np.int64))
    return train, test


def label_counts(labels: np.ndarray, parts: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """(clients x classes) sample counts."""
    labels = np.asarray(labels)
    return np.stack([np.bincount(labels[np.asarray(p, dtype=np.int64)], minlength=num_classes) for p in parts]).astype(
        np.int64
    )


def plot_label_counts(
    counts: np.ndarray, path: str | Path, *, class_names: Sequence[str] | None = None, title: str | None = None
) -> None:
    """Heatmap of samples per client (rows) and class (columns), written as PNG atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clients, classes = counts.shape
    # One row per client up to 40 clients; beyond that the figure stops growing (at 1,000 clients an
    # uncapped height was a 33,000-pixel image and half a gigabyte in the driver) and rows thin out.
    height = max(3.0, 0.3 * min(clients, 40) + 1.5)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * classes + 2), height))
    image = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("class")
    ax.set_ylabel("client")
    ax.set_xticks(range(classes))
    ax.set_xticklabels(class_names if class_names is not None else range(classes), rotation=45, ha="right", fontsize=7)
    if clients <= 40:
        ax.set_yticks(range(clients))
    ax.tick_params(axis="y", labelsize=7)
    if clients <= 20 and classes <= 10:
        high = counts.max() if counts.size else 0
        for i in range(clients):
            for j in range(classes):
                ax.text(
                    j,
                    i,
                    str(counts[i, j]),
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="black" if counts[i, j] > 0.6 * high else "white",
                )
    fig.colorbar(image, ax=ax, label="samples")
    ax.set_title(title or "samples per client and class", fontsize=9)
    fig.tight_layout()
    atomic_save(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
