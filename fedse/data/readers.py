"""Datasets from their standard on-disk formats, as in-memory uint8 tensors.

* ``digits``: scikit-learn's bundled handwritten digits (8x8, no download);
* ``mnist`` / ``fashion-mnist``: the four IDX files (``.gz`` or not);
* ``cifar10``: the official python pickle batches, an image-folder tree
  ``{train,test}/<class>/*.jpg|png``, or ``cifar10-{train,test}.tar.gz`` of
  such a tree (decoded once, cached as ``.npz``);
* ``imagefolder``: the user's own ``<root>/{train,test}/<class>/*``.

A :class:`Dataset` pools the official train and test splits (train first):
fedse partitions the pool across clients and gives every client its own
train/test split. Files are looked for in ``root``, ``$FEDSE_DATA``, the
Debian dataset directory (Fashion-MNIST) and ``../shared/data``; a missing
file raises :class:`DatasetError` naming it, the places searched and how to
get it. ``download=True`` fetches the official files where a network exists.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError, DataConfig, ModelConfig, choice_error, field_range
from ..io import atomic_save, atomic_write_bytes
from . import safe_pickle

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "IMAGE_SUFFIXES",
    "Dataset",
    "DatasetError",
    "dataset_spec",
    "hflip",
    "load_dataset",
    "load_own",
    "read_images",
    "register_dataset",
]


class DatasetError(RuntimeError):
    """A dataset's files are missing or malformed; the message says which and what to do."""


class DatasetMissing(DatasetError):
    """No file of the dataset where it was looked for (as opposed to a file that is there but damaged);
    ``missing``: what was looked for."""

    def __init__(self, message: str, missing: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.missing = list(missing)


@dataclass(frozen=True)
class Dataset:
    name: str
    images: torch.Tensor  # uint8 (N, C, H, W), official train split first, then test
    labels: torch.Tensor  # int64 (N,)
    classes: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, of images / 255
    std: tuple[float, ...]
    num_train: int

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[2])


def _make(name: str, images: np.ndarray, labels: np.ndarray, classes: Sequence[str], num_train: int) -> Dataset:
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    if x.ndim != 4 or len(x) != len(y):
        raise DatasetError(f"{name}: images {tuple(x.shape)} and labels {tuple(y.shape)} do not match")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(classes)):
        raise DatasetError(f"{name}: labels outside 0..{len(classes) - 1}")
    sums = torch.zeros(x.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(sums)
    for start in range(0, len(x), 8192):  # float64 moments in chunks: no full float copy
        chunk = x[start : start + 8192].to(torch.float64) / 255.0
        sums += chunk.sum(dim=(0, 2, 3))
        squares += (chunk**2).sum(dim=(0, 2, 3))
    count = len(x) * x.shape[2] * x.shape[3]
    mean = sums / count
    std = (squares / count - mean**2).clamp_min(1e-12).sqrt()
    return Dataset(name, x, y, tuple(classes), tuple(mean.tolist()), tuple(std.tolist()), num_train)


# ----------------------------------------------------------------------------- search paths


def _candidates(root: Path | None, subdir: str, extra: Sequence[Path] = ()) -> list[Path]:
    bases = [root] if root is not None else []
    if root is None:
        if env := os.environ.get("FEDSE_DATA"):
            bases.append(Path(env))
        bases += list(extra)
        bases.append(Path.cwd().parent / "shared" / "data")
    out = []
    for base in bases:
        out += [base, base / subdir]
    return out


def _missing(name: str, searched: Sequence[Path], files: Sequence[str], how: str = "") -> DatasetMissing:
    return DatasetMissing(
        f"{name}: missing file(s) {list(files)}; searched {[str(p) for p in searched]}. "
        f"{how}Point fedse at them with --set data.root=DIR or the FEDSE_DATA environment variable, "
        "or use --set data.download=true where a network exists.",
        files,
    )


def _download(urls: dict[str, tuple[str, str]], directory: Path) -> None:
    for filename, (url, md5) in urls.items():
        target = directory / filename
        if target.exists():
            continue
        try:
            with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 (official URLs)
                payload = response.read()
        except OSError as err:
            raise DatasetError(
                f"download of {url} failed ({err}); no network? fetch it by hand into {directory}"
            ) from None
        if hashlib.md5(payload).hexdigest() != md5:  # noqa: S324 (checksum, not security)
            raise DatasetError(f"download of {url}: MD5 mismatch, expected {md5}; file not written")
        atomic_write_bytes(target, payload)


def _download_dir(root: Path | None) -> Path:
    """Where ``download=True`` writes: ``root``, else ``$FEDSE_DATA``, else ``data/`` in :func:`cache_dir`."""
    if root is not None:
        return root
    return Path(os.environ.get("FEDSE_DATA") or cache_dir() / "data")


# ----------------------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def read_idx(path: Path, expect_magic: int) -> np.ndarray:
    """Strict IDX reader (uint8 data): magic number, dimensions and length are checked.

    A cut-short or damaged file (a half-finished download, a bad copy) is a :class:`DatasetError` naming it,
    not a bare ``EOFError``/``BadGzipFile``/``zlib.error`` traceback that says neither which file nor what to do.
    """
    try:
        if path.suffix == ".gz":
            with gzip.open(path) as handle:
                raw = handle.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise DatasetError(
            f"{path}: truncated or corrupt, cannot be read or decompressed "
            f"({type(err).__name__}: {err}); expected a complete IDX file, gzipped or not. "
            "Fetch it again."
        ) from None
    if len(raw) < 8:
        raise DatasetError(f"{path}: too short to be an IDX file ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expect_magic:
        raise DatasetError(f"{path}: IDX magic number {magic}, expected {expect_magic}; not the right file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if len(raw) != header + int(np.prod(dims)):
        raise DatasetError(
            f"{path}: {len(raw) - header} data bytes, expected {int(np.prod(dims))} for dims {dims}; "
            "truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(name: str, root: Path | None, subdir: str, extra: Sequence[Path], how: str) -> dict[str, Path]:
    searched = _candidates(root, subdir, extra)
    for directory in searched:
        found = {}
        for stem in IDX_FILES:
            for candidate in (directory / f"{stem}.gz", directory / stem):
                if candidate.is_file():
                    found[stem] = candidate
                    break
        if len(found) == len(IDX_FILES):
            return found
        if found:  # a partial set: name exactly what is missing here
            raise _missing(name, [directory], [f"{s}.gz" for s in IDX_FILES if s not in found], how)
    raise _missing(name, searched, [f"{s}.gz" for s in IDX_FILES], how)


def _load_idx_dataset(
    name: str,
    classes: Sequence[str],
    root: Path | None,
    download: bool,
    urls: dict[str, tuple[str, str]],
    extra: Sequence[Path] = (),
    how: str = "",
) -> Dataset:
    subdir = name
    if download:
        try:
            return _load_idx_dataset(name, classes, root, False, urls, extra, how)
        except DatasetError:
            directory = _download_dir(root) / subdir
            _download(urls, directory)
            root = directory
    files = _find_idx(name, root, subdir, extra, how)
    train_x, test_x = read_idx(files[IDX_FILES[0]], 2051), read_idx(files[IDX_FILES[2]], 2051)
    train_y, test_y = read_idx(files[IDX_FILES[1]], 2049), read_idx(files[IDX_FILES[3]], 2049)
    for x, y, which in ((train_x, train_y, "train"), (test_x, test_y, "t10k")):
        if len(x) != len(y):
            raise DatasetError(f"{name}: {which} has {len(x)} images but {len(y)} labels")
    images = np.concatenate([train_x, test_x])[:, None]
    return _make(name, images, np.concatenate([train_y, test_y]), classes, len(train_x))


def _idx_urls(base: str, md5s: Sequence[str]) -> dict[str, tuple[str, str]]:
    return {f"{stem}.gz": (f"{base}{stem}.gz", md5) for stem, md5 in zip(IDX_FILES, md5s, strict=True)}


MNIST_URLS = _idx_urls(
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    (
        "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "d53e105ee54ea40749a09fcbcd1e9432",
        "9fb629c4189551a2d022fa330f9573f3",
        "ec29112dd5afa0611ce80d1b7f02629c",
    ),
)
FASHION_URLS = _idx_urls(
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    (
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "25c81989df183df01b3e8a0aad5dffbe",
        "bef4ecab320f06d8554ea6380940ec79",
        "bb300cfdad3c16e7a12e480ee83cd310",
    ),
)
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR_URL = ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")


def load_mnist(root: Path | None, download: bool) -> Dataset:
    return _load_idx_dataset("mnist", [str(i) for i in range(10)], root, download, MNIST_URLS)


def load_fashion_mnist(root: Path | None, download: bool) -> Dataset:
    return _load_idx_dataset(
        "fashion-mnist",
        FASHION_CLASSES,
        root,
        download,
        FASHION_URLS,
        extra=[Path("/usr/share/datasets/fashion-mnist")],
        how="On Debian: apt-get install dataset-fashion-mnist (files land in /usr/share/datasets/fashion-mnist). ",
    )


def load_digits_dataset(root: Path | None, download: bool) -> Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return _make("digits", images, digits.target, [str(i) for i in range(10)], len(images))


# ----------------------------------------------------------------------------- image folders, CIFAR-10

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Images are used at their own size, so none is larger than the largest a model takes (model.image_size).
MAX_IMAGE_SIDE = int(field_range(ModelConfig, "image_size")[1])
MAX_IMAGE_PIXELS = MAX_IMAGE_SIDE**2
MAX_IMAGE_BYTES = 64 << 20  # a file in a tarball is read whole before its header: far above any PNG of that size


def _decode(handle: io.BytesIO | Path, where: str) -> np.ndarray:
    """One image file as HW (grey) or HWC (RGB) uint8. Its size is read from its header and checked
    before it is decoded: a PNG of a few kB may declare 20000 x 20000 pixels (1.2 GB once decoded)."""
    from PIL import Image

    allowed = (
        f"allowed: at most {MAX_IMAGE_PIXELS} pixels ({MAX_IMAGE_SIDE} x {MAX_IMAGE_SIDE}, model.image_size's largest)"
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the bound below is stricter
            image = Image.open(handle)
        with image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise DatasetError(f"{where}: an image of {width} x {height} pixels; {allowed}")
            return np.asarray(image.convert("RGB") if image.mode not in ("L", "RGB") else image)
    except Image.DecompressionBombError as err:
        raise DatasetError(f"{where}: refused before decoding ({err}); {allowed}") from None
    except OSError as err:
        raise DatasetError(f"{where}: not a readable image ({err})") from None


def _stack(arrays: list[np.ndarray], where: list[str]) -> np.ndarray:
    """(N, C, H, W) from HW or HWC arrays; grey only when every image is grey."""
    grey = all(a.ndim == 2 for a in arrays)
    out = []
    for a, name in zip(arrays, where, strict=True):
        if not grey and a.ndim == 2:
            a = np.repeat(a[:, :, None], 3, axis=2)
        if a.shape != (arrays[0].shape if grey or arrays[0].ndim == 3 else (*arrays[0].shape, 3)):
            raise DatasetError(
                f"{name}: size {a.shape} differs from the first image's {arrays[0].shape}; "
                "all images must have the same size"
            )
        out.append(a[None] if grey else a.transpose(2, 0, 1))
    return np.stack(out)


def read_images(paths: Sequence[Path]) -> torch.Tensor:
    """uint8 (N, C, H, W) of the image files ``paths`` (PNG, JPEG; all of one size; grey when all are)."""
    if not paths:
        raise DatasetError("no images given")
    return torch.from_numpy(_stack([_decode(Path(p), str(p)) for p in paths], [str(p) for p in paths]).copy())


def _read_folder_split(
    directory: Path, classes: Sequence[str] | None
) -> tuple[list[np.ndarray], list[int], list[str], list[str]]:
    """Images of ``directory/<class>/*`` labelled by their class's index in ``classes`` (None: the
    folders found, sorted). With ``classes`` given, a folder not among them is an error and a class
    without a folder simply has no images here: a client missing a class numbers the rest alike."""
    found = sorted(p.name for p in directory.iterdir() if p.is_dir())
    if classes and (unknown := sorted(set(found) - set(classes))):
        raise DatasetError(
            f"{directory}: class folders {unknown} are not among the run's classes {list(classes)} "
            "(data.classes); rename them or add them to data.classes on every client and the server"
        )
    classes = list(classes or found)
    arrays, labels, names = [], [], []
    for label, cls in enumerate(classes):
        for path in sorted((directory / cls).glob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                arrays.append(_decode(path, str(path)))
                labels.append(label)
                names.append(str(path))
    return arrays, labels, names, classes


def load_image_folder(root: Path, name: str = "imagefolder", classes: Sequence[str] | None = None) -> Dataset:
    if not (root / "train").is_dir():
        raise _missing(name, [root], ["train/<class>/*.jpg|png"])
    arrays, labels, names, classes = _read_folder_split(root / "train", classes)
    num_train = len(arrays)
    if (root / "test").is_dir():
        a, lab, n, _ = _read_folder_split(root / "test", classes)
        arrays, labels, names = arrays + a, labels + lab, names + n
    if not arrays:
        raise DatasetMissing(f"{name}: no {IMAGE_SUFFIXES} images under {root}/train/<class>/", ["train/<class>/*.png"])
    return _make(name, _stack(arrays, names), np.asarray(labels), classes, num_train)


def _read_tar_split(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    arrays, classes_of, names = [], [], []
    with tarfile.open(path) as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.isfile() and m.name.lower().endswith(IMAGE_SUFFIXES)),
            key=lambda m: m.name,
        )
        for m in members:
            if m.size > MAX_IMAGE_BYTES:
                raise DatasetError(f"{path}:{m.name}: {m.size} bytes; allowed: at most {MAX_IMAGE_BYTES} per image")
            arrays.append(_decode(io.BytesIO(tar.extractfile(m).read()), f"{path}:{m.name}"))
            classes_of.append(Path(m.name).parent.name)
            names.append(f"{path}:{m.name}")
    if not arrays:
        raise DatasetError(f"{path}: no images inside (expected <split>/<class>/*.jpg)")
    classes = sorted(set(classes_of))
    return _stack(arrays, names), np.asarray([classes.index(c) for c in classes_of]), classes


def cache_dir() -> Path:
    """The folder for what fedse can rebuild or fetch again (decoded CIFAR-10 tarballs, downloads
    when neither ``data.root`` nor ``$FEDSE_DATA`` is set): ``$FEDSE_CACHE``, else
    ``$XDG_CACHE_HOME/fedse`` (an absolute path only, as the XDG base-directory rules say), else
    ``~/.cache/fedse``."""
    if own := os.environ.get("FEDSE_CACHE"):
        return Path(own)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache") / "fedse"


def _load_cifar_tarballs(train_tar: Path, test_tar: Path) -> Dataset:
    stat = [train_tar.stat(), test_tar.stat()]
    key = hashlib.sha256(
        repr(
            [(str(p.resolve()), s.st_size, s.st_mtime_ns) for p, s in zip((train_tar, test_tar), stat, strict=True)]
        ).encode()
    ).hexdigest()[:16]
    cache = cache_dir() / f"cifar10-{key}.npz"
    if cache.is_file():
        try:  # never pickles: a planted cache file must not run code; an unreadable one is rebuilt
            with np.load(cache, allow_pickle=False) as z:
                images, labels, num_train = z["images"], z["labels"], int(z["num_train"])
        except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile, zlib.error):
            pass
        else:
            return _make("cifar10", images, labels, CIFAR_CLASSES, num_train)
    train_x, train_y, train_classes = _read_tar_split(train_tar)
    test_x, test_y, test_classes = _read_tar_split(test_tar)
    if train_classes != test_classes:
        raise DatasetError(f"{train_tar} and {test_tar} hold different classes: {train_classes} vs {test_classes}")
    images, labels = np.concatenate([train_x, test_x]), np.concatenate([train_y, test_y])
    atomic_save(cache, lambda f: np.savez(f, images=images, labels=labels, num_train=len(train_x)))
    return _make("cifar10", images, labels, train_classes, len(train_x))


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch as (N, 3, 32, 32) uint8 images and (N,) labels, every field checked.

    The file is untrusted (anyone who can write to a data directory can plant one), so it is read with
    :func:`fedse.data.safe_pickle.load` (numpy's array globals only, each state checked before an array
    is built; nothing else runs) and every shape, type and label is checked before use; anything else
    is a :class:`DatasetError` naming the file and what a batch must hold.
    """
    expected = 'a dict with b"data" (uint8 array N x 3072) and b"labels" (N ints in 0..9)'
    try:
        with path.open("rb") as handle:
            entry = safe_pickle.load(handle, encoding="bytes")  # the official batches: Python 2, bytes keys
    except safe_pickle.GlobalRefused as err:
        raise DatasetError(
            f"{path}: refusing to load {err}; a CIFAR-10 batch may only name {safe_pickle.ALLOWED}. Not an "
            "official CIFAR-10 python batch (or a crafted one): fetch cifar-10-python.tar.gz again."
        ) from None
    except safe_pickle.PickleRefused as err:
        raise DatasetError(
            f"{path}: the pickle holds {err}; expected a pickle of {expected}. Fetch cifar-10-python.tar.gz again."
        ) from None
    except Exception as err:  # noqa: BLE001 (truncated/garbled pickles fail in many ways; all mean the same)
        raise DatasetError(
            f"{path}: truncated or corrupt CIFAR-10 batch ({type(err).__name__}: {err}); "
            f"expected a pickle of {expected}. Fetch cifar-10-python.tar.gz again."
        ) from None
    if not isinstance(entry, dict):
        raise DatasetError(f"{path}: holds a {type(entry).__name__}, expected {expected}")
    missing = [key for key in (b"data", b"labels") if key not in entry]
    if missing:
        raise DatasetError(
            f"{path}: missing key(s) {missing} (found {sorted(map(repr, entry))[:8]}); expected {expected}"
        )
    data, labels = entry[b"data"], entry[b"labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        what = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f'{path}: b"data" is a {what}, expected a uint8 array N x 3072 (3 x 32 x 32 per image)')
    if isinstance(labels, np.ndarray):
        ok = labels.ndim == 1 and labels.dtype.kind in "iu"
    else:
        ok = isinstance(labels, list | tuple) and all(type(v) is int for v in labels)
    if not ok:
        raise DatasetError(
            f'{path}: b"labels" is a {type(labels).__name__} that is not a sequence of ints; expected N ints in 0..9'
        )
    if len(labels) != len(data):
        raise DatasetError(
            f'{path}: {len(data)} images in b"data" but {len(labels)} b"labels"; expected one label each'
        )
    if len(labels) and (int(min(labels)) < 0 or int(max(labels)) > 9):  # before any int64 cast can overflow
        raise DatasetError(f'{path}: b"labels" outside 0..9 (min {int(min(labels))}, max {int(max(labels))})')
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def _load_cifar_pickles(directory: Path) -> Dataset:
    def batch(name: str) -> tuple[np.ndarray, np.ndarray]:
        path = directory / name
        if not path.is_file():
            raise _missing("cifar10", [directory], [name])
        return _read_cifar_batch(path)

    parts = [batch(f"data_batch_{i}") for i in range(1, 6)] + [batch("test_batch")]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return _make("cifar10", images, labels, CIFAR_CLASSES, sum(len(p[1]) for p in parts[:5]))


def load_cifar10(root: Path | None, download: bool) -> Dataset:
    searched = _candidates(root, "cifar10")
    for directory in searched:
        if (directory / "cifar-10-batches-py").is_dir():
            return _load_cifar_pickles(directory / "cifar-10-batches-py")
        if (directory / "data_batch_1").is_file():
            return _load_cifar_pickles(directory)
        for tree in (directory, directory / "cifar10"):
            if (tree / "train").is_dir():
                return load_image_folder(tree, "cifar10", CIFAR_CLASSES)
        train_tar, test_tar = directory / "cifar10-train.tar.gz", directory / "cifar10-test.tar.gz"
        if train_tar.is_file() and test_tar.is_file():
            return _load_cifar_tarballs(train_tar, test_tar)
    if download:
        directory = _download_dir(root)
        _download({"cifar-10-python.tar.gz": CIFAR_URL}, directory)
        with tarfile.open(directory / "cifar-10-python.tar.gz") as tar:
            tar.extractall(directory, filter="data")
        return _load_cifar_pickles(directory / "cifar-10-batches-py")
    raise _missing(
        "cifar10",
        searched,
        [
            "cifar-10-batches-py/data_batch_1..5, test_batch",
            "or cifar10-train.tar.gz + cifar10-test.tar.gz",
            "or train/<class>/*.jpg",
        ],
    )


def _load_imagefolder(root: Path | None, download: bool, classes: Sequence[str]) -> Dataset:
    if root is None:
        raise DatasetError("imagefolder: set data.root to a directory holding train/<class>/*.jpg|png")
    return load_image_folder(root, classes=classes or None)


def _named(loader: Callable[[Path | None, bool], Dataset]) -> Callable[[Path | None, bool, Sequence[str]], Dataset]:
    """A named dataset's reader: its classes are its own (checked before, :func:`load_dataset`)."""
    return lambda root, download, classes: loader(root, download)


@dataclass(frozen=True)
class DatasetSpec:
    """Everything fedse knows of a dataset, in one row of :data:`DATASETS`.

    ``loader(root, download, classes)`` reads it. ``classes``, ``channels`` and ``image_size`` are what
    a server needs to build the model without holding any data (None: the config gives them, as for
    ``imagefolder``). ``hflip``: whether the training augmentation may mirror its images left-right
    (natural photographs; never digits or letters, whose mirror image is another symbol or none).
    ``own_format``: what a client's own data folder may hold (``fedse adapt --data-dir``,
    ``fedse client --data-dir``)."""

    name: str
    loader: Callable[[Path | None, bool, Sequence[str]], Dataset]
    classes: tuple[str, ...] | None
    channels: int | None
    image_size: int | None
    hflip: bool
    own_format: str


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Add ``spec`` to :data:`DATASETS` under its name (a name is registered once)."""
    if spec.name in DATASETS:
        raise ValueError(f"dataset {spec.name!r} is registered already")
    DATASETS[spec.name] = spec
    return spec


_DIGITS = tuple(str(i) for i in range(10))
for _spec in (
    DatasetSpec(
        "digits",
        _named(load_digits_dataset),
        _DIGITS,
        1,
        8,
        hflip=False,
        own_format="8x8 grey PNG images in one folder per digit, DIR/<0..9>/*.png (or DIR/train/<0..9>/*.png and "
        "DIR/test/<0..9>/*.png), pixel values 0..255 as fedse reads scikit-learn's digits (its 0..16 times 255/16)",
    ),
    DatasetSpec(
        "mnist",
        _named(load_mnist),
        _DIGITS,
        1,
        28,
        hflip=False,
        own_format=f"the four MNIST IDX files {list(IDX_FILES)} (gzipped or not)",
    ),
    DatasetSpec(
        "fashion-mnist",
        _named(load_fashion_mnist),
        FASHION_CLASSES,
        1,
        28,
        hflip=False,
        own_format=f"the four Fashion-MNIST IDX files {list(IDX_FILES)} (gzipped or not)",
    ),
    DatasetSpec(
        "cifar10",
        _named(load_cifar10),
        CIFAR_CLASSES,
        3,
        32,
        hflip=True,
        own_format="cifar-10-batches-py/ (data_batch_1..5, test_batch), cifar10-train.tar.gz and "
        "cifar10-test.tar.gz, or an image-folder tree DIR/train/<class>/*.png",
    ),
    DatasetSpec(
        "imagefolder",
        _load_imagefolder,
        None,
        None,
        None,
        hflip=False,  # road signs, text, digits: unknown, so never mirrored unless data.hflip says so
        own_format="an image-folder tree DIR/train/<class>/*.jpg|png (and DIR/test/<class>/*.jpg|png)",
    ),
):
    register_dataset(_spec)


def check_config(data: DataConfig) -> DatasetSpec:
    """``data.dataset`` is a registered name, and an image folder names its root; returns its spec."""
    if data.dataset not in DATASETS:
        raise choice_error("data.dataset", data.dataset, DATASETS)
    if data.dataset == "imagefolder" and data.root is None:
        raise ConfigError("config key 'data.root': dataset 'imagefolder' needs data.root=<dir with train/<class>/...>")
    return DATASETS[data.dataset]


def hflip(data: DataConfig) -> bool:
    """Whether the training augmentation mirrors images: ``data.hflip``, else the dataset's rule."""
    return data.hflip if data.hflip is not None else dataset_spec(data.dataset).hflip


def dataset_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid datasets: {sorted(DATASETS)}")
    return DATASETS[name]


def load_dataset(
    name: str, root: str | os.PathLike[str] | None = None, download: bool = False, classes: Sequence[str] = ()
) -> Dataset:
    """``classes``: for ``imagefolder``, the class names in label order (the folders are mapped onto
    them); for a named dataset they must be its own, in its order."""
    spec = dataset_spec(name)
    path = Path(root).expanduser() if root is not None else None
    _check_classes(spec, classes)
    return spec.loader(path, download, classes)


def _check_classes(spec: DatasetSpec, classes: Sequence[str]) -> None:
    if classes and spec.classes is not None and tuple(classes) != spec.classes:
        raise DatasetError(
            f"data.classes {list(classes)} differ from {spec.name}'s classes {list(spec.classes)}; "
            "leave data.classes empty for a named dataset"
        )


def _load_digits_folder(root: Path) -> Dataset:
    """Digits as image files: ``root/<digit>/*``, or ``root/train/<digit>/*`` with ``root/test/<digit>/*``.
    Pixel values are those of :func:`load_digits_dataset`, so a bundled digit written as a grey PNG reads
    back as the same tensor."""
    spec = DATASETS["digits"]
    classes, size = spec.classes, spec.image_size
    if (root / "train").is_dir():
        data = load_image_folder(root, "digits", classes)
    else:
        unknown = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in classes)
        if unknown:
            raise DatasetError(f"digits: folders {unknown} in {root} are not digit classes; allowed: {spec.own_format}")
        arrays, labels, names, _ = _read_folder_split(root, classes)
        if not arrays:
            raise DatasetMissing(f"digits: no {IMAGE_SUFFIXES} images under {root}/<digit>/", ["<0..9>/*.png"])
        data = _make("digits", _stack(arrays, names), np.asarray(labels), classes, len(arrays))
    if data.images.shape[1:] != (1, size, size):
        channels, height, width = data.images.shape[1:]
        raise DatasetError(
            f"digits: the images under {root} have {channels} channel(s) of {height}x{width}; "
            f"allowed: {size}x{size} grey images, as scikit-learn's digits"
        )
    return data


def load_own(name: str, directory: str | os.PathLike[str], classes: Sequence[str] = ()) -> Dataset:
    """A client's own data: every sample of dataset ``name`` found in ``directory`` and nowhere else
    (no other place is searched, nothing is downloaded, the bundled digits are not used). A missing
    folder, or one holding none of the formats its :class:`DatasetSpec` allows (``own_format``), is a
    :class:`DatasetError` naming the folder and what is allowed."""
    spec = dataset_spec(name)
    path = Path(directory).expanduser()
    allowed = f"allowed: a folder holding {spec.own_format}"
    if not path.is_dir():
        what = "is not a folder" if path.exists() else "does not exist"
        raise DatasetError(f"{name} data folder {str(path)!r} {what}; {allowed}")
    try:
        if name == "digits":
            _check_classes(spec, classes)
            return _load_digits_folder(path)
        return load_dataset(name, path, classes=classes)
    except DatasetMissing as err:
        raise DatasetError(
            f"{name} data folder {str(path)!r} holds no usable {name} data (missing {err.missing}); {allowed}"
        ) from None
