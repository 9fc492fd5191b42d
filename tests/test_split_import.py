"""Bring your own split: PFLlib's dataset folders and plain index files become the federation's shards
exactly as the files say, the split's digest is recorded and pinned, and hostile files are one error."""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
from conftest import cpu_state, tiny_config
from flwr.app import Array, ArrayRecord

from fedse.analysis.comparison import comparable
from fedse.analysis.report import RunLog
from fedse.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fedse.config import ConfigError, config_from_dict, config_to_record
from fedse.data.federated import _build, build_federated_data
from fedse.data.readers import load_dataset
from fedse.data.split_import import SPLIT_RECORD, SplitError, _import, pin_split
from fedse.models import build_model
from fedse.policies import ClientRun, resolve
from fedse.rundir import write_partition
from fedse.spec import resolve as resolve_run

DIGITS = load_dataset("digits")
IMAGES, LABELS = DIGITS.images.numpy(), DIGITS.labels.numpy()

# Three clients' (train, test) indices into digits, in no sorted order: the shards must keep the files' order.
_ORDER = np.random.default_rng(7).permutation(len(LABELS))
PARTS = [(_ORDER[0:90], _ORDER[90:120]), (_ORDER[120:180], _ORDER[180:200]), (_ORDER[200:500], _ORDER[500:600])]
# The digest of PARTS as an index split, and of their images and labels as a PFLlib folder: a change to the
# canonical form (split_digest) changes a recorded run's digest, so it changes these too.
INDEX_SHA256 = "c6ff03e37bbdab144152f3a35b7d8478c06da3dcc977791ade0a2fa591406209"
ARRAYS_SHA256 = "38277ba90a44a723d676f34041646217415d3402211a555e7975868ae3a3a0ba"


@pytest.fixture(autouse=True)
def _fresh():
    _build.cache_clear()
    _import.cache_clear()
    yield
    _build.cache_clear()
    _import.cache_clear()


def _cfg(split, **partition):
    server = {"min_train_clients": 1, "min_evaluate_clients": 1}
    return tiny_config(partition={"scheme": "file", "split": str(split), **partition}, server=server)


def _index_json(path, parts=PARTS, **extra):
    path.write_text(
        json.dumps(
            {**extra, "clients": [{"train": list(map(int, tr)), "test": list(map(int, te))} for tr, te in parts]}
        )
    )
    return path


def _index_npz(path, parts=PARTS, **extra):
    arrays = {
        f"{which}_{k}": part
        for k, pair in enumerate(parts)
        for which, part in zip(("train", "test"), pair, strict=True)
    }
    np.savez(path, **arrays, **extra)
    return path


def _pflib_images(index, as_float=True):
    """The images PFLlib's generators store: ToTensor then Normalize(0.5, 0.5), float32 N x C x H x W."""
    x = IMAGES[index]
    return ((x.astype(np.float32) / 255.0 - 0.5) / 0.5).astype(np.float32) if as_float else x


def _npz_pickle(path, payload):
    """An .npz holding 'data' as np.savez stores a dict: an object-array .npy with ``payload`` as its pickle."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|O", "fortran_order": False, "shape": ()})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("data.npy", header.getvalue() + payload)


def _pickled_dict(obj, numpy_core="numpy._core"):
    """The pickle of ``np.savez(data=obj)`` at protocol 3 (numpy 1.x, as PFLlib's files are written), with
    numpy's module spelt ``numpy_core``."""
    wrapped = np.empty((), dtype=object)
    wrapped[()] = obj
    payload = pickle.dumps(wrapped, protocol=3)
    assert b"numpy._core.multiarray\n_reconstruct\n" in payload
    return payload.replace(b"numpy._core.multiarray\n", f"{numpy_core}.multiarray\n".encode())


def _pflib(folder, parts=PARTS, *, as_float=True, numpy_core=None, meta=None):
    """A PFLlib dataset folder of ``parts``: np.savez_compressed(data={'x', 'y'}) per client and part
    (``numpy_core``: written at protocol 3 with that spelling, as numpy 1.x did)."""
    for which in ("train", "test"):
        (folder / which).mkdir(parents=True)
    config = {"num_clients": len(parts), "num_classes": 10, "non_iid": True, "balance": False, "partition": "dir"}
    (folder / "config.json").write_text(json.dumps(meta if meta is not None else config))
    for k, pair in enumerate(parts):
        for which, index in zip(("train", "test"), pair, strict=True):
            data = {"x": _pflib_images(index, as_float), "y": LABELS[index].astype(np.int64)}
            if numpy_core is None:
                with open(folder / which / f"{k}.npz", "wb") as f:
                    np.savez_compressed(f, data=data)
            else:
                _npz_pickle(folder / which / f"{k}.npz", _pickled_dict(data, numpy_core))
    return folder


def _assert_shards(fed, parts=PARTS):
    assert fed.num_clients == len(parts)
    for k, (tr, te) in enumerate(parts):
        shard = fed.shard(k)
        for images, labels, index in (
            (shard.train_images, shard.train_labels, tr),
            (shard.test_images, shard.test_labels, te),
        ):
            assert torch.equal(images, torch.from_numpy(IMAGES[index]))
            assert torch.equal(labels, torch.from_numpy(LABELS[index]))


# ----------------------------------------------------------------------------- the shards are the files'


@pytest.mark.parametrize("write,name", [(_index_json, "split.json"), (_index_npz, "split.npz")], ids=["json", "npz"])
def test_an_index_file_gives_each_client_exactly_its_train_and_test_indices(tmp_path, write, name):
    path = write(tmp_path / name)
    fed = build_federated_data(_cfg(path))
    for k, (tr, te) in enumerate(PARTS):  # the indices as the file has them: not sorted, not re-split
        assert np.array_equal(fed.train_parts[k], tr) and np.array_equal(fed.test_parts[k], te)
    _assert_shards(fed)
    assert fed.dataset is not None and fed.dataset.name == "digits"
    assert fed.split.format == path.suffix[1:] and fed.split.path == str(path.resolve())
    assert fed.split.sha256 == INDEX_SHA256  # the same split in JSON and NPZ: the same digest


@pytest.mark.parametrize("numpy_core", [None, "numpy.core", "numpy._core"])
@pytest.mark.parametrize("as_float", [True, False], ids=["float32", "uint8"])
def test_a_pflib_folder_gives_each_client_exactly_its_own_arrays(tmp_path, numpy_core, as_float):
    folder = _pflib(tmp_path / "fmnist", as_float=as_float, numpy_core=numpy_core)
    fed = build_federated_data(_cfg(folder))
    _assert_shards(fed)  # float32 PFLlib pixels mapped back to the uint8 grey levels they came from
    assert fed.split.format == "pflib" and fed.split.sha256 == ARRAYS_SHA256
    sizes = [(len(tr), len(te)) for tr, te in PARTS]
    assert [(len(a), len(b)) for a, b in zip(fed.train_parts, fed.test_parts, strict=True)] == sizes
    assert fed.dataset.num_train == sum(len(tr) for tr, _ in PARTS)  # the pool: every train part, then every test


def test_the_digest_is_recorded_in_the_run_folder_and_a_resume_on_another_split_is_refused(tmp_path):
    path = _index_json(tmp_path / "split.json")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_partition(build_federated_data(_cfg(path)), run_dir)
    record = json.loads((run_dir / SPLIT_RECORD).read_text())
    assert record["sha256"] == INDEX_SHA256 and record["path"] == str(path.resolve()) and record["format"] == "json"
    assert record["train_samples"] == [len(tr) for tr, _ in PARTS] and record["test_samples"] == [
        len(te) for _, te in PARTS
    ]
    write_partition(build_federated_data(_cfg(path)), run_dir)  # the same split again: a resume goes on

    moved = [(PARTS[0][0][1:], PARTS[0][1]), *PARTS[1:]]  # one sample less
    _index_json(path, moved)
    _build.cache_clear()
    _import.cache_clear()
    with pytest.raises(
        SplitError, match=rf"cannot resume {run_dir}: it ran on the split .*SHA-256 {INDEX_SHA256}"
    ) as err:
        write_partition(build_federated_data(_cfg(path)), run_dir)
    assert "\n" not in str(err.value)
    assert json.loads((run_dir / SPLIT_RECORD).read_text()) == record  # refused before anything was written


def test_a_pinned_digest_refuses_another_split_and_not_the_same_one_elsewhere(tmp_path):
    path = _index_json(tmp_path / "split.json")
    pinned = pin_split(_cfg(tmp_path / "." / "split.json"))
    assert pinned.partition.split == str(path.resolve()) and pinned.partition.split_sha256 == INDEX_SHA256
    assert pin_split(tiny_config()) == tiny_config()  # no imported split: nothing to pin
    resolve_run(pinned)

    # a checkpoint of the pinned run resumes with the split moved (its path differs, its digest not) ...
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shared = {"w": torch.zeros(2)}
    save_checkpoint(run_dir, pinned, 1, ArrayRecord({k: Array(v.numpy()) for k, v in shared.items()}), RunLog())
    elsewhere = tmp_path / "moved.npz"
    _index_npz(elsewhere)
    moved = pin_split(_cfg(elsewhere))
    assert load_checkpoint(run_dir, moved, shared).round == 1
    assert comparable(config_to_record(pinned), ["fedavg"]) == comparable(config_to_record(moved), ["fedavg"])

    # ... and not on another split: the checkpoint's config, a merge, and the pin itself refuse it
    other = tmp_path / "other.json"
    _index_json(other, PARTS[::-1])
    changed = pin_split(_cfg(other))
    with pytest.raises(CheckpointError, match=r"partition\.split_sha256: 'c6ff03e3.*' -> '[0-9a-f]{64}'"):
        load_checkpoint(run_dir, changed, shared)
    assert comparable(config_to_record(pinned), ["fedavg"]) != comparable(config_to_record(changed), ["fedavg"])
    _index_json(path, PARTS[::-1])
    _import.cache_clear()
    with pytest.raises(
        SplitError,
        match=rf"split {path.resolve()}: its content has SHA-256 [0-9a-f]{{64}}, but "
        rf"partition\.split_sha256 is {INDEX_SHA256}",
    ):
        build_federated_data(pinned)


def test_a_training_step_runs_on_the_imported_shards(tmp_path):
    cfg = _cfg(_pflib(tmp_path / "pflib"), num_clients=3)
    fed = build_federated_data(cfg)
    ds, shard = fed.dataset, fed.shard(2)
    model = build_model(cfg, ds.num_classes, ds.channels, ds.image_size)
    policy = resolve(cfg)
    split = policy.split(model)
    before = cpu_state(model)
    ClientRun(cfg, policy, shard, ds.mean, ds.std, seed=0).local_update(model, split)
    after = cpu_state(model)
    assert any(not torch.equal(before[k], after[k]) for k in split.shared)
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())


# ----------------------------------------------------------------------------- the configuration


@pytest.mark.parametrize(
    "partition,pattern",
    [
        ({"scheme": "file"}, r"'partition\.split': None, but partition\.scheme=file reads the split from it"),
        ({"scheme": "file", "split": "x.json", "test_fraction": 0.2}, r"'partition\.test_fraction': 0\.2, but under"),
        ({"split": "x.json"}, r"'partition\.split': 'x\.json' is only used by partition\.scheme=file"),
        (
            {"scheme": "file", "split": "x.json", "split_sha256": "ABC"},
            r"'partition\.split_sha256': 'ABC'; allowed: 64",
        ),
        ({"scheme": "shards"}, r"'partition\.scheme'.*'quantity', 'file'"),
    ],
)
def test_the_split_keys_are_checked_with_the_scheme(partition, pattern):
    with pytest.raises(ConfigError, match=pattern):
        resolve_run(config_from_dict({"partition": partition}))


# ----------------------------------------------------------------------------- hostile files: one line each


def _hostile_index(tmp_path, case):
    bad = [list(map(int, p)) for pair in PARTS for p in pair]  # train0, test0, train1, ...
    if case == "out of range":
        bad[3].append(len(LABELS))
    elif case == "negative":
        bad[0][0] = -1
    elif case == "overlap":
        bad[2].append(bad[5][0])
    elif case == "train and test":
        bad[1].append(bad[0][0])
    elif case == "float":
        bad[4][2] = float(bad[4][2])
    elif case == "empty":
        bad[1] = []
    parts = [(bad[2 * k], bad[2 * k + 1]) for k in range(len(PARTS))]
    if case == "count":
        parts = parts[:2]
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"clients": [{"train": tr, "test": te} for tr, te in parts]}))
    return path


INDEX_CASES = {
    "out of range": r"client 1's test part holds the index 1797, outside digits \(1797 samples\); allowed: integer "
    r"indices in 0\.\.1796",
    "negative": r"client 0's train part holds the index -1, outside digits",
    "overlap": r"sample \d+ is in client 1's train part and in client 2's test part; allowed: every sample in at most "
    r"one part",
    "train and test": r"sample \d+ is in client 0's train part and in client 0's test part",
    "float": r"client 2's train part holds \d+\.0 \(float\); allowed: integer indices",
    "empty": r"client 0's test part is empty; allowed: at least one sample",
    "count": r"2 clients, but partition\.num_clients=3; allowed: .*--set partition\.num_clients=2",
}


@pytest.mark.parametrize("case", INDEX_CASES)
def test_a_hostile_index_file_is_one_error_naming_it(tmp_path, case):
    path = _hostile_index(tmp_path, case)
    with pytest.raises(SplitError, match=INDEX_CASES[case]) as err:
        build_federated_data(_cfg(path))
    assert str(err.value).startswith(f"split {path.resolve()}: ") and "\n" not in str(err.value)


NPZ_CASES = {
    "float indices": (
        {"train_0": np.array([1.0, 2.0]), "test_0": np.array([3])},
        r"client 0's train part is a float64 array",
    ),
    "missing test": (
        {"train_0": np.array([1]), "train_1": np.array([2]), "test_0": np.array([3])},
        r"no array 'test_1'",
    ),
    "unknown key": ({"train_0": np.array([1]), "test_0": np.array([3]), "extra": np.array([0])}, r"an array 'extra'"),
    "pickled": ({"train_0": np.array([1, 2], dtype=object), "test_0": np.array([3])}, r"holds pickled Python objects"),
    "other dataset": (
        {"train_0": np.array([1]), "test_0": np.array([3]), "dataset": np.array("mnist")},
        r"indices into 'mnist', but data\.dataset='digits'",
    ),
}


@pytest.mark.parametrize("case", NPZ_CASES)
def test_a_hostile_npz_index_file_is_one_error_naming_it(tmp_path, case):
    arrays, pattern = NPZ_CASES[case]
    path = tmp_path / "split.npz"
    np.savez(path, **arrays)
    with pytest.raises(SplitError, match=pattern) as err:
        build_federated_data(_cfg(path, num_clients=1 + (case == "missing test")))
    assert str(path.resolve()) in str(err.value) and "\n" not in str(err.value)


class _System:
    """Unpickling this calls os.system: the shape of a crafted client file that runs a command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _PastTheList:
    """numpy's own pickle of an object array whose state promises 100,000 items and holds one:
    ``ndarray.__setstate__`` reads past the list (numpy 2.4: garbage pointers, then a crash)."""

    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct

        return _reconstruct, (np.ndarray, (0,), b"b"), (1, (100_000,), np.dtype("O"), False, [1])


def test_a_pickle_naming_any_other_global_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "marker"
    folder = _pflib(tmp_path / "pflib")
    client = folder / "train" / "1.npz"
    _npz_pickle(client, _pickled_dict({"x": _System(marker), "y": LABELS[:2]}))
    with pytest.raises(
        SplitError, match=r"refusing to unpickle the global (posix|os|nt)\.system \(nothing was run\)"
    ) as err:
        build_federated_data(_cfg(folder))
    assert f"split {client.resolve()} (data): " in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


def test_a_pickle_of_numpy_globals_with_a_lying_state_is_refused_not_crashed(tmp_path):
    folder = _pflib(tmp_path / "pflib")
    _npz_pickle(folder / "test" / "0.npz", _pickled_dict({"x": _PastTheList(), "y": LABELS[:1]}))
    with pytest.raises(SplitError, match=r"test/0\.npz \(data\): the pickle holds an object array of 100000 items"):
        build_federated_data(_cfg(folder))


def _fmnist_normalised(folder):
    """Images normalised by a dataset's own mean and std (not PFLlib's 0.5, 0.5): no grey level maps back."""
    x = (IMAGES[PARTS[0][0]].astype(np.float32) / 255.0 - 0.286) / 0.353
    with open(folder / "train" / "0.npz", "wb") as f:
        np.savez_compressed(f, data={"x": x, "y": LABELS[PARTS[0][0]]})


PFLLIB_CASES = {
    "missing client file": (
        lambda f: (f / "test" / "2.npz").unlink(),
        r"test/2\.npz: missing; allowed: test/<k>\.npz for k = 0\.\.2",
    ),
    "extra client file": (
        lambda f: (f / "train" / "3.npz").write_bytes(b""),
        r"train/3\.npz: a client file beyond num_clients=3",
    ),
    "no config": (lambda f: (f / "config.json").unlink(), r"no config\.json in it; allowed: a PFLlib dataset folder"),
    "count": (
        lambda f: (f / "config.json").write_text('{"num_clients": 2}'),
        r"config\.json: 2 clients, but partition\.num_clients=3",
    ),
    "classes": (
        lambda f: (f / "config.json").write_text('{"num_clients": 3, "num_classes": 62}'),
        r"num_classes is 62; allowed: 10",
    ),
    "not a zip": (
        lambda f: (f / "train" / "1.npz").write_bytes(b"PK\x03\x04 not really"),
        r"train/1\.npz: not a readable \.npz",
    ),
    "other normalisation": (
        _fmnist_normalised,
        r"train/0\.npz: 'x' holds -0\.81.*which maps to grey level 24\.1.*allowed: uint8 images, or float images as "
        r"PFLlib normalises them",
    ),
    "label": (
        lambda f: np.savez(f / "test" / "1.npz", x=IMAGES[:2], y=np.array([3, 10])),
        r"test/1\.npz: the label 10; allowed: labels in 0\.\.9",
    ),
    "shape": (
        lambda f: np.savez(f / "test" / "1.npz", x=IMAGES[:2, :, :4], y=LABELS[:2]),
        r"'x' has shape \(2, 1, 4, 8\); allowed: images N x 1 x 8 x 8",
    ),
    "keys": (lambda f: np.savez(f / "test" / "1.npz", images=IMAGES[:2]), r"test/1\.npz: holds \['images'\]"),
}


@pytest.mark.parametrize("case", PFLLIB_CASES)
def test_a_hostile_pflib_folder_is_one_error_naming_the_file(tmp_path, case):
    folder = _pflib(tmp_path / "pflib")
    damage, pattern = PFLLIB_CASES[case]
    damage(folder)
    with pytest.raises(SplitError, match=pattern) as err:
        build_federated_data(_cfg(folder))
    assert str(err.value).startswith(f"split {folder.resolve()}") and "\n" not in str(err.value)


def test_plain_x_and_y_arrays_are_a_pflib_client_file_too(tmp_path):
    folder = _pflib(tmp_path / "pflib")
    index = PARTS[1][1]
    np.savez(folder / "test" / "1.npz", x=_pflib_images(index), y=LABELS[index])  # no pickle: the same content
    assert build_federated_data(_cfg(folder)).split.sha256 == ARRAYS_SHA256


def test_a_missing_split_is_one_error(tmp_path):
    with pytest.raises(SplitError, match=r"split .*nowhere\.json: does not exist; allowed: a PFLlib dataset folder"):
        build_federated_data(_cfg(tmp_path / "nowhere.json"))
    (tmp_path / "split.csv").write_text("0,1\n")
    with pytest.raises(SplitError, match=r"split\.csv: a file named '\.csv'; allowed: a \.json index file"):
        build_federated_data(_cfg(tmp_path / "split.csv"))


def test_a_new_run_pins_the_split_and_a_resume_keeps_what_its_record_pinned(tmp_path):
    import argparse

    from fedse.analysis.report import write_record
    from fedse.cli import _run_config

    path = _index_json(tmp_path / "split.json")
    sets = ["partition.scheme=file", f"partition.split={path}", "partition.num_clients=3"]
    args = argparse.Namespace(config=None, overrides=sets)
    pinned = _run_config(args, None)
    assert (pinned.partition.split, pinned.partition.split_sha256) == (str(path.resolve()), INDEX_SHA256)

    run = tmp_path / "run"
    run.mkdir()
    write_record(run, pinned)
    assert _run_config(argparse.Namespace(config=None, overrides=[]), run) == pinned
    unpinned = tmp_path / "unpinned"  # a run started through the API with no pin: its record is kept as it was
    unpinned.mkdir()
    write_record(unpinned, _cfg(path))
    assert _run_config(argparse.Namespace(config=None, overrides=[]), unpinned).partition.split_sha256 is None

    _index_json(path, PARTS[::-1])  # the pinned split changed under the run: its resume is refused
    _import.cache_clear()
    with pytest.raises(SplitError, match=rf"but partition\.split_sha256 is {INDEX_SHA256}"):
        _run_config(argparse.Namespace(config=None, overrides=[]), run)
