"""Bring your own split: a partition read from files (``partition.scheme: file``, ``partition.split``).

Two formats, told apart by the path:

* **A PFLlib dataset folder**: ``config.json``, ``train/<k>.npz`` and ``test/<k>.npz`` for k = 0..n-1,
  each file one client's own images and labels. PFLlib writes them with
  ``np.savez_compressed(f, data={'x': images, 'y': labels})``, a pickle, which
  :mod:`fedse.data.safe_pickle` reads: of all globals it resolves only the ones numpy's own pickles of
  arrays name (``_reconstruct``, ``ndarray``, ``dtype``), and each to a stand-in of fedse's, so no
  numpy code sees the file's bytes (numpy's ``ndarray.__setstate__`` trusts the list an object array
  is rebuilt from and reads past its end). Dicts, lists, strings and numbers need no global; any
  other global is refused before anything runs. A file holding the arrays ``x`` and ``y`` (no
  pickle) is read as well.
* **An index file**, ``.json`` or ``.npz`` (plain arrays, no pickle): per client, the indices of its
  train and test samples into ``data.dataset`` in fedse's order (:class:`~fedse.data.readers.Dataset`:
  the official train split, then the test split).

Every client's train and test part is the file's, as it is: nothing is re-split, reordered or left
out. A PFLlib folder's images become the dataset (every client's train part, then every test part):
uint8 images as they are; float images must be PFLlib's normalisation of a grey level,
``(u / 255 - 0.5) / 0.5`` for ``u`` in 0..255, and are mapped back to ``u`` (a value that maps to no
grey level is refused); fedse then normalises them by their own mean and std, as any dataset.

The split's digest (:func:`split_digest`) is the SHA-256 of its content in one canonical form, the
same whatever the file format: a run records it (:func:`record_split`), ``partition.split_sha256``
pins it (:func:`pin_split`), and a run on another split is refused. Every file is untrusted: each
problem is one :class:`SplitError` naming the file, the problem and what is allowed.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import re
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from ..config import MAX_CLIENTS, Config, PartitionConfig, short_repr
from ..io import atomic_write_json
from . import safe_pickle
from .partition import FILE_SCHEME, PartitionError
from .readers import Dataset, _check_classes, _make, dataset_spec, load_dataset

__all__ = [
    "SPLIT_RECORD",
    "SPLIT_SCHEME",
    "ImportedSplit",
    "SplitError",
    "SplitInfo",
    "comparable_partition",
    "import_split",
    "pin_split",
    "record_split",
    "split_digest",
]

SPLIT_SCHEME = FILE_SCHEME  # partition.scheme of an imported split
SPLIT_RECORD = "split.json"  # what a run folder records of the split it ran on
MAX_INDEX_BYTES = 256 << 20  # an index JSON file (70,000 indices are about 500 kB)
MAX_META_BYTES = 16 << 20  # PFLlib's config.json (a few kB)
MAX_MEMBER_BYTES = 2 << 30  # one array in an .npz, decompressed (PFLlib: a client's float32 images)
GREY_TOLERANCE = 1e-3  # how far from a grey level a float pixel may map (float32 rounding: about 1e-5)
PFLLIB_MEAN, PFLLIB_STD = 0.5, 0.5  # the normalisation PFLlib's generators apply (transforms.Normalize)

_PFLLIB = (
    "a PFLlib dataset folder: config.json (with num_clients), train/<k>.npz and test/<k>.npz for k = 0..n-1, "
    "each holding 'data' (a pickled dict of 'x' images N x C x H x W and 'y' labels N) or the arrays 'x' and 'y'"
)
_INDEX = (
    'a .json index file {"clients": [{"train": [...], "test": [...]}, ...]} (optionally "dataset": the name) or '
    "an .npz of integer arrays train_<k> and test_<k> for k = 0..n-1 (optionally 'dataset')"
)


class SplitError(PartitionError):
    """A split file is missing, malformed or not the one expected; the message names the file."""


def _fail(path: Path | str, problem: str, allowed: str) -> SplitError:
    return SplitError(f"split {path}: {problem}; allowed: {allowed}")


@dataclasses.dataclass(frozen=True)
class SplitInfo:
    """Which split a federation was built from: its absolute path, format and content digest."""

    path: str
    format: str  # 'pflib', 'json' or 'npz'
    sha256: str
    num_clients: int

    def record(self, train: Sequence[np.ndarray], test: Sequence[np.ndarray]) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "train_samples": [len(p) for p in train],
            "test_samples": [len(p) for p in test],
        }


@dataclasses.dataclass(frozen=True)
class ImportedSplit:
    dataset: Dataset
    train: tuple[np.ndarray, ...]  # int64 indices into dataset, per client, in the file's order
    test: tuple[np.ndarray, ...]
    info: SplitInfo


# ----------------------------------------------------------------------------- digest


def split_digest(
    train: Sequence[np.ndarray],
    test: Sequence[np.ndarray],
    images: np.ndarray | None = None,
    labels: np.ndarray | None = None,
) -> str:
    """SHA-256 of a split's content. Without ``images``: an index split, hashed as the line
    ``fedse-split/1 indices <clients>``, then for each client ``k`` its train then test part as the
    line ``<train|test> <k> (<n>,)`` and the indices as int64 little-endian. With ``images`` (uint8
    N x C x H x W) and ``labels``: the parts index them, and each part is hashed as the line
    ``<train|test> <k> (<n>, C, H, W)``, its uint8 images and its labels as int64 little-endian
    (``arrays`` in the first line). The same split in JSON or NPZ, float or uint8 has the same digest."""
    kind = "indices" if images is None else "arrays"
    digest = hashlib.sha256(f"fedse-split/1 {kind} {len(train)}\n".encode())
    for k, (tr, te) in enumerate(zip(train, test, strict=True)):
        for name, part in (("train", tr), ("test", te)):
            if images is None or labels is None:
                blocks = [np.ascontiguousarray(part, dtype="<i8")]
            else:
                blocks = [np.ascontiguousarray(images[part], np.uint8), np.ascontiguousarray(labels[part], "<i8")]
            digest.update(f"{name} {k} {tuple(blocks[0].shape)}\n".encode())
            for block in blocks:
                digest.update(block.tobytes())
    return digest.hexdigest()


def _cut(text: str) -> str:
    return short_repr(text, 80).strip("'\"")


# ----------------------------------------------------------------------------- .npz and .json, read as untrusted


def _read_npy(handle: IO[bytes], size: int, where: str, pickled: bool) -> Any:
    """One ``.npy`` member: a plain array (its header checked against the bytes there), or with
    ``pickled`` a pickled object array through :class:`_ArrayUnpickler`."""
    version = np.lib.format.read_magic(handle)
    if version not in ((1, 0), (2, 0)):
        raise _fail(where, f".npy format version {version}", "versions 1.0 and 2.0, as numpy writes")
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(handle)
    if dtype.hasobject:
        if not pickled:
            raise _fail(where, "holds pickled Python objects", "plain integer arrays (an index file holds no pickle)")
        try:
            return safe_pickle.load(handle)
        except safe_pickle.GlobalRefused as err:
            raise SplitError(
                f"split {where}: refusing to unpickle {err} (nothing was run); allowed: a pickle naming only "
                f"numpy's array globals {safe_pickle.ALLOWED}, as PFLlib's np.savez_compressed writes (or convert "
                "the file to plain arrays, docs/data.md#bring-your-own-split)"
            ) from None
        except safe_pickle.PickleRefused as err:
            raise _fail(where, f"the pickle holds {err}", "a dict of numpy arrays, as PFLlib writes") from None
        except Exception as err:  # noqa: BLE001 (a truncated or garbled pickle fails in many ways)
            raise _fail(where, f"truncated or corrupt pickle ({type(err).__name__})", _PFLLIB) from None
    if dtype.fields is not None or dtype.subdtype is not None or dtype.kind not in "biufU":
        raise _fail(where, f"an array of dtype {dtype}", "integer, float or (for 'dataset') string arrays")
    nbytes = math.prod(shape) * dtype.itemsize
    data = handle.read(nbytes) if nbytes <= size else b""
    if len(data) != nbytes:
        raise _fail(where, f"truncated: its header promises {shape} of {dtype}", "a complete .npy")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")


def _read_npz(path: Path, pickled: bool) -> dict[str, Any]:
    """Every array of an ``.npz`` by its name, each member read as untrusted (:func:`_read_npy`)."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            if len(members) > 2 * MAX_CLIENTS + 1:
                raise _fail(path, f"{len(members)} arrays", f"at most {2 * MAX_CLIENTS + 1}")
            out: dict[str, Any] = {}
            for info in members:
                name = info.filename.removesuffix(".npy")
                if name == info.filename or name in out or "/" in name:
                    raise _fail(
                        path, f"a member {_cut(info.filename)!r}", "one <name>.npy per array, as np.savez writes"
                    )
                if info.file_size > MAX_MEMBER_BYTES:
                    raise _fail(path, f"{name!r} of {info.file_size} bytes", f"at most {MAX_MEMBER_BYTES} per array")
                with archive.open(info) as handle:
                    out[name] = _read_npy(handle, info.file_size, f"{path} ({name})", pickled)
    except SplitError:
        raise
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        zlib.error,
        EOFError,
        OSError,
        ValueError,
        RuntimeError,  # an encrypted member, or (NotImplementedError) a compression zipfile lacks
    ) as err:
        problem = f"not a readable .npz ({type(err).__name__}: {_cut(str(err))})"
        raise _fail(path, problem, "a file np.savez writes") from None
    return out


def _read_json(path: Path, limit: int, allowed: str) -> Any:
    try:
        with path.open("rb") as handle:
            raw = handle.read(limit + 1)
    except OSError as err:
        raise _fail(path, f"cannot be read ({err.strerror or err})", allowed) from None
    if len(raw) > limit:
        raise _fail(path, f"larger than {limit} bytes", allowed)
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as err:  # ValueError: bad JSON, bad UTF-8, an integer of 4,300 digits
        raise _fail(path, f"not valid JSON ({_cut(str(err))})", allowed) from None


# ----------------------------------------------------------------------------- index files


def _read_index_file(path: Path) -> tuple[str | None, list[tuple[Any, Any]], str]:
    """(the dataset the file names or None, per client (train, test) as read, 'json' or 'npz')."""
    if path.suffix == ".json":
        data = _read_json(path, MAX_INDEX_BYTES, _INDEX)
        clients = data.get("clients") if isinstance(data, dict) else None
        if (
            not isinstance(data, dict)
            or set(data) - {"dataset", "clients"}
            or not isinstance(clients, list)
            or not all(isinstance(c, dict) and set(c) == {"train", "test"} for c in clients)
            or not isinstance(data.get("dataset", ""), str)
        ):
            raise _fail(path, "not an index file", _INDEX)
        return data.get("dataset"), [(c["train"], c["test"]) for c in clients], "json"
    arrays = _read_npz(path, pickled=False)
    dataset = arrays.pop("dataset", None)
    if dataset is not None:
        if dataset.dtype.kind != "U" or dataset.ndim:
            raise _fail(path, f"'dataset' is a {dataset.dtype} array of shape {dataset.shape}", "a string")
        dataset = str(dataset)
    count = sum(1 for name in arrays if name.startswith("train_"))
    expected = {f"{part}_{k}" for part in ("train", "test") for k in range(count)}
    if set(arrays) != expected:
        odd = sorted(set(arrays) ^ expected, key=lambda n: (len(n), n))[0]
        problem = f"no array {odd!r}" if odd in expected else f"an array {_cut(odd)!r}"
        raise _fail(path, problem, _INDEX)
    return dataset, [(arrays[f"train_{k}"], arrays[f"test_{k}"]) for k in range(count)], "npz"


def _index_part(values: Any, total: int, path: Path, where: str, dataset: str) -> np.ndarray:
    """One part's indices as int64, once they are integers, in range and not empty."""
    allowed = f"integer indices in 0..{total - 1} into {dataset} (its official train split, then its test split)"
    if isinstance(values, np.ndarray):
        if values.ndim != 1 or values.dtype.kind not in "iu":
            raise _fail(path, f"{where} is a {values.dtype} array of shape {values.shape}", allowed)
    elif isinstance(values, list):
        odd = next((v for v in values if type(v) is not int), None)
        if odd is not None:
            raise _fail(path, f"{where} holds {short_repr(odd, 40)} ({type(odd).__name__})", allowed)
    else:
        raise _fail(path, f"{where} is a {type(values).__name__}", f"a list of {allowed}")
    if len(values) == 0:
        raise _fail(path, f"{where} is empty", "at least one sample in every client's train and test part")
    low, high = (values.min(), values.max()) if isinstance(values, np.ndarray) else (min(values), max(values))
    if low < 0 or high >= total:
        bad = low if low < 0 else high
        raise _fail(path, f"{where} holds the index {int(bad)}, outside {dataset} ({total} samples)", allowed)
    return np.array(values, dtype=np.int64)  # a copy: writable, not the file's buffer


def _check_disjoint(train: Sequence[np.ndarray], test: Sequence[np.ndarray], path: Path) -> None:
    """No sample in two parts (two clients, or one client's train and test) nor twice in one."""
    parts = [p for pair in zip(train, test, strict=True) for p in pair]
    every = np.concatenate(parts)
    owner = np.repeat(np.arange(len(parts)), [len(p) for p in parts])
    order = np.argsort(every, kind="stable")
    ranked = every[order]
    twice = np.flatnonzero(ranked[1:] == ranked[:-1])
    if twice.size:
        first, second = owner[order[twice[0]]], owner[order[twice[0] + 1]]
        name = lambda o: f"client {o // 2}'s {'train' if o % 2 == 0 else 'test'} part"  # noqa: E731
        where = f"twice in {name(first)}" if first == second else f"in {name(first)} and in {name(second)}"
        raise _fail(
            path,
            f"sample {int(ranked[twice[0]])} is {where}",
            "every sample in at most one part of one client (disjoint train and test parts, disjoint clients)",
        )


def _count(path: Path, found: int, num_clients: int) -> None:
    if found != num_clients:
        raise _fail(
            path,
            f"{found} clients, but partition.num_clients={num_clients}",
            f"partition.num_clients equal to the split's clients (--set partition.num_clients={found})"
            if found
            else "at least one client",
        )


def _import_indices(path: Path, dataset: Dataset, num_clients: int) -> tuple[list[np.ndarray], ...]:
    named, raw, _ = _read_index_file(path)
    if named is not None and named != dataset.name:
        raise _fail(path, f"indices into {short_repr(named, 60)}, but data.dataset={dataset.name!r}", "the same")
    _count(path, len(raw), num_clients)
    total = len(dataset.labels)
    train, test = [], []
    for k, (tr, te) in enumerate(raw):
        train.append(_index_part(tr, total, path, f"client {k}'s train part", dataset.name))
        test.append(_index_part(te, total, path, f"client {k}'s test part", dataset.name))
    _check_disjoint(train, test, path)
    return train, test


# ----------------------------------------------------------------------------- PFLlib folders


def _grey(images: np.ndarray, path: Path) -> np.ndarray:
    """uint8 images as they are; float images mapped back from PFLlib's normalisation, exactly."""
    if images.dtype == np.uint8:
        return images
    allowed = (
        f"uint8 images, or float images as PFLlib normalises them, (u / 255 - {PFLLIB_MEAN}) / {PFLLIB_STD} for "
        "a grey level u in 0..255"
    )
    if images.dtype.kind != "f":
        raise _fail(path, f"'x' is a {images.dtype} array", allowed)
    out = np.empty(images.shape, dtype=np.uint8)
    flat, dest = images.reshape(-1), out.reshape(-1)
    for start in range(0, len(flat), 1 << 22):  # float64 in chunks: no full copy of a large client
        level = (flat[start : start + (1 << 22)].astype(np.float64) * PFLLIB_STD + PFLLIB_MEAN) * 255.0
        rounded = np.rint(level)
        bad = ~(np.abs(level - rounded) <= GREY_TOLERANCE) | (rounded < 0) | (rounded > 255)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            value = flat[start + i]
            raise _fail(path, f"'x' holds {float(value)!r}, which maps to grey level {float(level[i])!r}", allowed)
        dest[start : start + len(rounded)] = rounded
    return out


def _client_arrays(path: Path, shape: tuple[int, int, int] | None, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One PFLlib client file's (uint8 images, int64 labels), every field checked."""
    members = _read_npz(path, pickled=True)
    if set(members) == {"data"}:
        data = members["data"]
        if not isinstance(data, dict) or set(data) != {"x", "y"}:
            what = f"a dict of {sorted(map(str, data))[:6]}" if isinstance(data, dict) else type(data).__name__
            raise _fail(path, f"'data' is {what}", "a dict of 'x' (images) and 'y' (labels), as PFLlib writes")
    elif set(members) == {"x", "y"}:
        data = members
    else:
        raise _fail(path, f"holds {sorted(members)[:6]}", _PFLLIB)
    x, y = data["x"], data["y"]
    want = "N x C x H x W (square images)" if shape is None else f"N x {shape[0]} x {shape[1]} x {shape[2]}"
    if not isinstance(x, np.ndarray) or x.ndim != 4 or (x.shape[1:] != shape if shape else x.shape[2] != x.shape[3]):
        what = f"shape {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise _fail(path, f"'x' has {what}", f"images {want}")
    if not isinstance(y, np.ndarray) or y.ndim != 1 or y.dtype.kind not in "iu" or len(y) != len(x):
        what = f"a {y.dtype} array of shape {y.shape}" if isinstance(y, np.ndarray) else type(y).__name__
        raise _fail(path, f"'y' is {what} for {len(x)} images", "one integer label per image")
    if len(y) == 0:
        raise _fail(path, "no samples", "at least one sample in every client's train and test part")
    if int(y.min()) < 0 or int(y.max()) >= classes:
        bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
        raise _fail(path, f"the label {bad}", f"labels in 0..{classes - 1} (the dataset's {classes} classes)")
    return _grey(x, path), y.astype(np.int64)


def _pflib_meta(folder: Path, num_clients: int, classes: int) -> int:
    meta_path = folder / "config.json"
    if not meta_path.is_file():
        raise _fail(folder, "no config.json in it", _PFLLIB)
    meta = _read_json(meta_path, MAX_META_BYTES, _PFLLIB)
    found = meta.get("num_clients") if isinstance(meta, dict) else None
    if type(found) is not int or not 0 < found <= MAX_CLIENTS:
        raise _fail(meta_path, f"num_clients is {short_repr(found, 40)}", f"an integer in 1..{MAX_CLIENTS}")
    _count(meta_path, found, num_clients)
    stated = meta.get("num_classes", classes)
    if type(stated) is not int or stated != classes:
        raise _fail(meta_path, f"num_classes is {short_repr(stated, 40)}", f"{classes}, data.dataset's classes")
    for part in ("train", "test"):
        directory = folder / part
        if not directory.is_dir():
            raise _fail(directory, "missing", _PFLLIB)
        present = {p.name for p in directory.iterdir() if re.fullmatch(r"\d+\.npz", p.name)}
        wanted = [f"{k}.npz" for k in range(found)]
        if missing := [n for n in wanted if n not in present]:
            raise _fail(directory / missing[0], "missing", f"{part}/<k>.npz for k = 0..{found - 1} ({_PFLLIB})")
        if extra := sorted(present - set(wanted)):
            raise _fail(directory / extra[0], f"a client file beyond num_clients={found}", f"k = 0..{found - 1}")
    return found


def _import_pflib(folder: Path, name: str, classes: Sequence[str], num_clients: int) -> ImportedSplit:
    spec = dataset_spec(name)
    shape = (spec.channels, spec.image_size, spec.image_size) if spec.channels and spec.image_size else None
    count = _pflib_meta(folder, num_clients, len(classes))
    parts = {
        part: [_client_arrays(folder / part / f"{k}.npz", shape, len(classes)) for k in range(count)]
        for part in ("train", "test")
    }
    blocks = parts["train"] + parts["test"]
    if len({x.shape[1:] for x, _ in blocks}) > 1:
        raise _fail(folder, f"images of shapes {sorted({x.shape[1:] for x, _ in blocks})}", "one image shape")
    images, labels = np.concatenate([x for x, _ in blocks]), np.concatenate([y for _, y in blocks])
    ends = np.cumsum([len(y) for _, y in blocks])
    ranges = [np.arange(end - len(y), end, dtype=np.int64) for (_, y), end in zip(blocks, ends, strict=True)]
    train, test = ranges[:count], ranges[count:]
    digest = split_digest(train, test, images, labels)
    dataset = _make(name, images, labels, classes, int(ends[count - 1]))
    return ImportedSplit(dataset, tuple(train), tuple(test), SplitInfo(str(folder), "pflib", digest, count))


# ----------------------------------------------------------------------------- the federation's split


@functools.lru_cache(maxsize=2)
def _import(
    path: str, name: str, root: str | None, download: bool, classes: tuple[str, ...], num_clients: int
) -> ImportedSplit:
    where = Path(path)
    if where.is_dir():
        spec = dataset_spec(name)
        _check_classes(spec, classes)
        names = spec.classes or classes
        if not names:
            raise _fail(where, f"data.dataset {name!r} names no classes", "data.classes set, in label order")
        return _import_pflib(where, name, names, num_clients)
    if not where.is_file():
        raise _fail(where, "does not exist", f"{_PFLLIB}; or {_INDEX}")
    if where.suffix not in (".json", ".npz"):
        raise _fail(where, f"a file named {where.suffix or 'without a suffix'!r}", f"{_INDEX}; or {_PFLLIB}")
    dataset = load_dataset(name, root=root, download=download, classes=classes)
    train, test = _import_indices(where, dataset, num_clients)
    info = SplitInfo(path, where.suffix[1:], split_digest(train, test), len(train))
    return ImportedSplit(dataset, tuple(train), tuple(test), info)


def _where(p: PartitionConfig) -> str:
    if p.split is None:
        raise SplitError(
            f"config key 'partition.split': null, but partition.scheme={SPLIT_SCHEME} reads the split from it; "
            f"allowed: {_PFLLIB}; or {_INDEX}"
        )
    try:
        return str(Path(p.split).expanduser().resolve())
    except (OSError, RuntimeError) as err:  # RuntimeError: a symlink loop
        raise _fail(p.split, f"cannot be resolved ({_cut(str(err))})", "a path to a file or folder") from None


def import_split(
    p: PartitionConfig, dataset: str, *, root: str | None = None, download: bool = False, classes: Sequence[str] = ()
) -> ImportedSplit:
    """The split ``p.split`` names (cached per process), checked against ``p.split_sha256`` where set."""
    imported = _import(_where(p), dataset, root, download, tuple(classes), p.num_clients)
    if p.split_sha256 is not None and p.split_sha256 != imported.info.sha256:
        raise _fail(
            imported.info.path,
            f"its content has SHA-256 {imported.info.sha256}, but partition.split_sha256 is {p.split_sha256} "
            "(the split the run was started on)",
            "the split with that digest (put it back), or a new run on this one",
        )
    return imported


def pin_split(cfg: Config) -> Config:
    """``cfg`` with an imported split's path made absolute and its digest pinned
    (``partition.split_sha256``), as a run records them; any other configuration as it is."""
    p = cfg.partition
    if p.scheme != SPLIT_SCHEME:
        return cfg
    d = cfg.data
    info = import_split(p, d.dataset, root=d.root, download=d.download, classes=d.classes).info
    return dataclasses.replace(cfg, partition=dataclasses.replace(p, split=info.path, split_sha256=info.sha256))


def comparable_partition(section: dict[str, Any]) -> dict[str, Any]:
    """A recorded ``partition`` section less the split's path where its digest is pinned: the same
    content is the same split wherever it lies (a resume or merge on another machine)."""
    if section.get("split_sha256") is None:
        return section
    return {k: v for k, v in section.items() if k != "split"}


def record_split(
    run_dir: Path, info: SplitInfo | None, train: Sequence[np.ndarray], test: Sequence[np.ndarray]
) -> None:
    """Write the run folder's :data:`SPLIT_RECORD` (path, format, digest, part sizes) of an imported
    split; a folder that holds one already (a resumed run) must name the same digest."""
    path = Path(run_dir) / SPLIT_RECORD
    if path.exists():
        was = _read_json(path, MAX_META_BYTES, f"the {SPLIT_RECORD} fedse wrote")
        digest = was.get("sha256") if isinstance(was, dict) else None
        if not isinstance(digest, str):
            raise _fail(path, "not a split record (no sha256)", f"the {SPLIT_RECORD} fedse wrote")
        if info is None or digest != info.sha256:
            now = "no imported split" if info is None else f"{info.path} (SHA-256 {info.sha256})"
            raise SplitError(
                f"cannot resume {run_dir}: it ran on the split {short_repr(was.get('path'), 200)} (SHA-256 "
                f"{_cut(digest)}), this run's partition is {now}; allowed: the split the run started on"
            )
    if info is not None:
        atomic_write_json(path, info.record(train, test))
