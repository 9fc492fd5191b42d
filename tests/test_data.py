"""Dataset readers on hand-made files in every supported format, plus the real copies when present."""

import gzip
import io
import pathlib
import pickle
import struct
import tarfile
import zlib

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA
from PIL import Image

from fedse.data.readers import DATASETS, DatasetError, hflip, load_dataset, load_own
from fedse.data.transforms import augment, normalize


def _idx(images: np.ndarray | None = None, labels: np.ndarray | None = None) -> bytes:
    if images is not None:
        n, h, w = images.shape
        return (2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (n, h, w)) + images.tobytes()
    return (2049).to_bytes(4, "big") + len(labels).to_bytes(4, "big") + labels.astype(np.uint8).tobytes()


def _write_idx(directory, train=5, test=3, gz=True, size=4):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (train + test, size, size), dtype=np.uint8)
    y = rng.integers(0, 10, train + test).astype(np.uint8)
    files = {
        "train-images-idx3-ubyte": _idx(x[:train]),
        "train-labels-idx1-ubyte": _idx(labels=y[:train]),
        "t10k-images-idx3-ubyte": _idx(x[train:]),
        "t10k-labels-idx1-ubyte": _idx(labels=y[train:]),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, payload in files.items():
        (directory / (name + (".gz" if gz else ""))).write_bytes(gzip.compress(payload) if gz else payload)
    return x, y


def test_digits_ship_with_scikit_learn():
    from sklearn.datasets import load_digits

    ds = load_dataset("digits")
    assert ds.images.shape == (1797, 1, 8, 8) and ds.images.dtype == torch.uint8
    assert int(ds.images.max()) == 255 and ds.num_classes == 10
    assert torch.equal(ds.labels, torch.from_numpy(load_digits().target).long())


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    x, y = _write_idx(tmp_path / "mnist", gz=gz)
    ds = load_dataset("mnist", root=tmp_path)  # found in <root>/mnist
    assert ds.num_train == 5 and ds.images.shape == (8, 1, 4, 4)
    assert np.array_equal(ds.images[:, 0].numpy(), x) and np.array_equal(ds.labels.numpy(), y)
    expected_mean = x.astype(np.float64).mean() / 255
    assert ds.mean[0] == pytest.approx(expected_mean)


def test_bad_or_truncated_idx_names_the_file(tmp_path):
    _write_idx(tmp_path)
    bad = tmp_path / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(gzip.compress((1234).to_bytes(4, "big") + (3).to_bytes(4, "big") + b"abc"))
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte\.gz: IDX magic number 1234, expected 2049"):
        load_dataset("fashion-mnist", root=tmp_path)
    _write_idx(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-5]))
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte\.gz: .*truncated"):
        load_dataset("mnist", root=tmp_path)


@pytest.mark.parametrize(
    "damage, error",
    [
        (lambda gz: gz[: len(gz) // 2], "EOFError"),  # cut short: a half-finished download
        (lambda gz: gz[:10] + b"\xff" * 64, "zlib.error|error"),  # valid gzip header, garbage deflate stream
        (lambda gz: b"not a gzip file at all", "BadGzipFile"),  # an OSError subclass
        (lambda gz: gz[:-8] + b"\0\0\0\0" + gz[-4:], "BadGzipFile"),  # CRC mismatch
    ],
)
def test_truncated_or_corrupt_gz_idx_is_a_dataset_error_naming_the_file(tmp_path, damage, error):
    _write_idx(tmp_path, train=50)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(damage(path.read_bytes()))
    message = rf"train-images-idx3-ubyte\.gz: truncated or corrupt.*({error})"
    with pytest.raises(DatasetError, match=message) as info:
        load_dataset("mnist", root=tmp_path)
    assert str(path) in str(info.value)


def test_missing_file_is_named_with_the_directory(tmp_path):
    _write_idx(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match=r"missing file\(s\) \['t10k-images-idx3-ubyte.gz'\].*" + str(tmp_path)):
        load_dataset("mnist", root=tmp_path)
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", root=tmp_path / "nothing")


def test_cifar_pickle_batches_keep_channel_order(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        data = np.zeros((2, 3072), dtype=np.uint8)
        data[0, 1024 + 32 * 5 + 7] = 200 + i  # channel 1 (green), row 5, column 7
        with (d / name).open("wb") as f:
            pickle.dump({b"data": data, b"labels": [i % 10, 9]}, f)
    ds = load_dataset("cifar10", root=tmp_path)
    assert ds.images.shape == (12, 3, 32, 32) and ds.num_train == 10
    assert int(ds.images[0, 1, 5, 7]) == 200 and int(ds.images[10, 1, 5, 7]) == 205
    assert ds.labels.tolist()[:2] == [0, 9]


_VALID = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 9]})


def _cifar_batches(directory, **override):
    """Six small valid batches (2 images each), any of them replaced by raw bytes from ``override``."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]:
        (directory / name).write_bytes(override.get(name, _VALID))


class _Touch:
    """Unpickling this calls ``Path.touch(marker)``: the shape of a crafted batch that runs code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


class _Exec:
    """Unpickling this calls ``builtins.exec``: builtins other than plain containers are refused too."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize("gadget", [_Touch, _Exec])
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_crafted_cifar_pickle_does_not_run(tmp_path, gadget, protocol):
    control = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(gadget(control), protocol=protocol))  # the payload is live under pickle.load...
    assert control.exists()

    marker = tmp_path / "marker"
    root = tmp_path / "root"  # data_batch_1 directly under data.root
    _cifar_batches(root, data_batch_1=pickle.dumps(gadget(marker), protocol=protocol))
    refused = r"data_batch_1: refusing to load the global (pathlib|builtins|__builtin__)\."
    with pytest.raises(DatasetError, match=refused) as info:
        load_dataset("cifar10", root=root)
    assert str(root / "data_batch_1") in str(info.value) and "numpy.dtype" in str(info.value)
    assert not marker.exists()  # ...but not through fedse


class _Py2Pickler(pickle._Pickler):
    """Writes bytes and str as Python 2 ``str`` (BINSTRING), as cPickle did for the official CIFAR-10 batches."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


def _py2_batch(data, labels, numpy_core="numpy._core"):
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(
        {
            b"batch_label": b"training batch 1 of 5",
            b"labels": labels,
            b"data": data,
            b"filenames": [b"a.png"] * len(labels),
        }
    )
    payload = buffer.getvalue()
    assert b"numpy._core.multiarray\n_reconstruct\n" in payload and b"_codecs" not in payload
    return payload.replace(b"numpy._core.multiarray\n", numpy_core.encode() + b".multiarray\n")


@pytest.mark.parametrize("numpy_core", ["numpy.core", "numpy._core"])  # numpy 1.x and numpy 2 module names
def test_official_format_python2_batches_load(tmp_path, numpy_core):
    data = np.arange(2 * 3072, dtype=np.uint32).astype(np.uint8).reshape(2, 3072)
    _cifar_batches(
        tmp_path,
        **{
            name: _py2_batch(data, [3, 4], numpy_core)
            for name in [f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]
        },
    )
    ds = load_dataset("cifar10", root=tmp_path)
    assert ds.images.shape == (12, 3, 32, 32) and ds.labels.tolist() == [3, 4] * 6
    assert np.array_equal(ds.images[:2].reshape(2, 3072).numpy(), data)


@pytest.mark.parametrize(
    "payload, message",
    [
        (_VALID[: len(_VALID) // 2], r"truncated or corrupt CIFAR-10 batch"),
        (b"", r"truncated or corrupt CIFAR-10 batch \(EOFError"),
        (b"\x80\x05garbage", r"truncated or corrupt CIFAR-10 batch"),
        (pickle.dumps([1, 2, 3]), r"holds a list, expected a dict"),
        (
            pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 9]}),
            r"missing key\(s\) \[b'data', b'labels'\]",
        ),
        (
            pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 9]}),
            r"float32 array .*expected a uint8",
        ),
        (pickle.dumps({b"data": np.zeros((2, 3071), np.uint8), b"labels": [0, 9]}), r"shape \(2, 3071\)"),
        (pickle.dumps({b"data": b"\0" * 6144, b"labels": [0, 9]}), r'b"data" is a bytes'),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}), r"outside 0\.\.9"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, -1]}), r"outside 0\.\.9"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 2**70]}), r"outside 0\.\.9"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}), r"2 images .* but 1 b\"labels\""),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, "9"]}), r"not a sequence of ints"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1.0]}), r"not a sequence of ints"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": 2}), r"not a sequence of ints"),
    ],
)
def test_malformed_cifar_batch_names_the_file(tmp_path, payload, message):
    d = tmp_path / "cifar-10-batches-py"
    _cifar_batches(d, test_batch=payload)
    with pytest.raises(DatasetError, match=r"test_batch: .*" + message) as info:
        load_dataset("cifar10", root=tmp_path)
    assert str(d / "test_batch") in str(info.value)


def _png_tree(root, split, pixels):
    for cls, values in pixels.items():
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        for i, v in enumerate(values):
            Image.fromarray(np.full((4, 4, 3), v, dtype=np.uint8)).save(root / split / cls / f"{i}.png")


def test_image_folder_and_tarball_read_the_same_pixels(tmp_path, monkeypatch):
    tree = tmp_path / "tree"
    _png_tree(tree, "train", {"cat": [10, 20], "dog": [30]})
    _png_tree(tree, "test", {"cat": [40], "dog": [50]})
    folder = load_dataset("imagefolder", root=tree)
    assert folder.classes == ("cat", "dog") and folder.num_train == 3
    assert folder.images[:, 0, 0, 0].tolist() == [10, 20, 30, 40, 50]
    assert folder.labels.tolist() == [0, 0, 1, 0, 1]

    tars = tmp_path / "tars"
    tars.mkdir()
    for split in ("train", "test"):
        with tarfile.open(tars / f"cifar10-{split}.tar.gz", "w:gz") as tar:
            tar.add(tree / split, arcname=f"cifar10/{split}")
    monkeypatch.setenv("FEDSE_CACHE", str(tmp_path / "cache"))
    from_tar = load_dataset("cifar10", root=tars)
    assert torch.equal(from_tar.images, folder.images) and torch.equal(from_tar.labels, folder.labels)
    assert len(list((tmp_path / "cache").glob("cifar10-*.npz"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("tarball re-read despite the cache")

    monkeypatch.setattr(tarfile, "open", refuse)
    cached = load_dataset("cifar10", root=tars)
    assert torch.equal(cached.images, folder.images)


def test_unreadable_or_pickled_cifar_cache_is_rebuilt_not_unpickled(tmp_path, monkeypatch):
    tree, tars = tmp_path / "tree", tmp_path / "tars"
    _png_tree(tree, "train", {"cat": [10], "dog": [30]})
    _png_tree(tree, "test", {"cat": [40], "dog": [50]})
    tars.mkdir()
    for split in ("train", "test"):
        with tarfile.open(tars / f"cifar10-{split}.tar.gz", "w:gz") as tar:
            tar.add(tree / split, arcname=f"cifar10/{split}")
    monkeypatch.setenv("FEDSE_CACHE", str(tmp_path / "cache"))
    first = load_dataset("cifar10", root=tars)
    (cache,) = (tmp_path / "cache").glob("cifar10-*.npz")
    marker = tmp_path / "marker"
    planted = io.BytesIO()  # an object array: reading it would unpickle _Touch
    np.savez(planted, images=np.array([_Touch(marker)], dtype=object), labels=np.zeros(1), num_train=1)
    for payload in (cache.read_bytes()[:100], planted.getvalue()):
        cache.write_bytes(payload)
        again = load_dataset("cifar10", root=tars)
        assert torch.equal(again.images, first.images) and not marker.exists()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "home/.cache/fedse"),
        ({"XDG_CACHE_HOME": "{tmp}/xdg"}, "xdg/fedse"),
        ({"XDG_CACHE_HOME": "relative/xdg"}, "home/.cache/fedse"),  # not absolute: ignored, as XDG says
        ({"XDG_CACHE_HOME": "{tmp}/xdg", "FEDSE_CACHE": "{tmp}/mine"}, "mine"),
    ],
)
def test_the_cache_and_downloads_go_where_the_environment_says(tmp_path, monkeypatch, env, expected):
    from fedse.data import readers

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("FEDSE_CACHE", "XDG_CACHE_HOME", "FEDSE_DATA"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(tmp=tmp_path))
    assert readers.cache_dir() == tmp_path / expected
    assert readers._download_dir(None) == tmp_path / expected / "data"
    monkeypatch.setenv("FEDSE_DATA", str(tmp_path / "data"))
    assert readers._download_dir(None) == tmp_path / "data"
    assert readers._download_dir(tmp_path / "root") == tmp_path / "root"


def test_image_folder_rejects_mixed_sizes_naming_the_file(tmp_path):
    _png_tree(tmp_path, "train", {"a": [1]})
    Image.fromarray(np.zeros((5, 5, 3), dtype=np.uint8)).save(tmp_path / "train" / "a" / "odd.png")
    with pytest.raises(DatasetError, match=r"odd\.png: size"):
        load_dataset("imagefolder", root=tmp_path)


def test_normalize_and_augment():
    x = torch.tensor([[[[51]]]], dtype=torch.uint8)
    assert normalize(x, (0.1,), (0.5,)).item() == pytest.approx((51 / 255 - 0.1) / 0.5)
    batch = torch.randn(6, 3, 5, 5)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(augment(batch, g, crop_padding=0, flip=False), batch)
    flipped = augment(batch, torch.Generator().manual_seed(1), crop_padding=0, flip=True)
    kinds = [torch.equal(f, b) or torch.equal(f, b.flip(2)) for f, b in zip(flipped, batch, strict=True)]
    assert all(kinds) and not torch.equal(flipped, batch)
    # Every output is a window of the zero-padded input at an offset in 0..2p (p = crop_padding),
    # mirrored or not when flip is on; pixel values are distinct and non-zero, so the window is unique.
    images = torch.arange(1, 256 * 2 * 5 * 5 + 1, dtype=torch.float32).view(256, 2, 5, 5)
    for p, flip in ((1, False), (2, False), (1, True)):
        out = augment(images, torch.Generator().manual_seed(2), crop_padding=p, flip=flip)
        assert out.shape == images.shape
        padded = torch.nn.functional.pad(images, (p,) * 4)
        drawn = []
        for o, img in zip(out, padded, strict=True):
            windows = {(dy, dx): img[:, dy : dy + 5, dx : dx + 5] for dy in range(2 * p + 1) for dx in range(2 * p + 1)}
            found = [
                (at, f)
                for at, win in windows.items()
                for f in (False, True)
                if torch.equal(o, win.flip(2) if f else win)
            ]
            assert len(found) == 1, found
            drawn.append(found[0])
        assert {at for at, _ in drawn} == set(windows)  # every shift occurs (pinned by the seed)
        assert {f for _, f in drawn} == ({False, True} if flip else {False})


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match="unknown dataset 'svhn'.*valid datasets"):
        load_dataset("svhn")


def _digit_pngs(root, indices):
    """The bundled digits ``indices`` written as 8x8 grey PNGs into ``root/<digit>/``; their file paths."""
    bundled = load_dataset("digits")
    paths = []
    for i in indices:
        folder = root / str(int(bundled.labels[i]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(bundled.images[i, 0].numpy()).save(folder / f"{i:04d}.png")
        paths.append(folder / f"{i:04d}.png")
    return bundled, paths


def test_own_digits_are_exactly_the_pngs_in_the_folder_with_the_bundled_values(tmp_path):
    bundled, paths = _digit_pngs(tmp_path / "own", range(0, 40, 3))
    own = load_own("digits", tmp_path / "own")
    # read class by class, each class's files by name: the bundled tensors in that order, unchanged
    order = [int(p.stem) for p in sorted(paths, key=lambda p: (int(p.parent.name), p.name))]
    assert len(own.labels) == len(paths) == 14
    assert torch.equal(own.images, bundled.images[order]) and torch.equal(own.labels, bundled.labels[order])
    assert own.classes == bundled.classes  # every digit class, whichever the folder holds
    # the train/test tree of the image-folder format reads the same images
    _digit_pngs(tmp_path / "tree" / "train", range(0, 40, 3))
    assert torch.equal(load_own("digits", tmp_path / "tree").images, own.images)


def test_own_digits_refuse_images_of_another_shape_and_folders_that_are_no_digit(tmp_path):
    (tmp_path / "rgb" / "3").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "rgb" / "3" / "a.png")
    with pytest.raises(DatasetError, match=r"3 channel\(s\) of 8x8; allowed: 8x8 grey images"):
        load_own("digits", tmp_path / "rgb")
    (tmp_path / "named" / "seven").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"folders \['seven'\] .* are not digit classes; allowed: .*DIR/<0..9>"):
        load_own("digits", tmp_path / "named")


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_own_data_from_a_missing_or_empty_folder_names_it_and_what_is_allowed(tmp_path, name):
    assert DATASETS[name].own_format  # every dataset says what its own data folder may hold
    (tmp_path / "empty" / "0").mkdir(parents=True)
    (tmp_path / "empty" / "0" / "notes.txt").write_text("no image")
    (tmp_path / "file").write_text("x")
    for folder, what in (("missing", "does not exist"), ("file", "is not a folder"), ("empty", "holds no usable")):
        with pytest.raises(DatasetError) as info:
            load_own(name, tmp_path / folder)
        message = str(info.value)
        assert f"{name} data folder '{tmp_path / folder}' {what}" in message
        assert f"allowed: a folder holding {DATASETS[name].own_format}" in message
        assert "data.root" not in message  # own data is read from that folder alone


@pytest.mark.skipif(not (SHARED_DATA / "mnist").is_dir(), reason="../shared/data/mnist not present")
def test_real_mnist():
    ds = load_dataset("mnist", root=SHARED_DATA)
    assert len(ds.labels) == 70000 and ds.num_train == 60000
    counts = torch.bincount(ds.labels[:60000], minlength=10).tolist()
    assert counts == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def test_real_fashion_mnist_from_debian():
    from pathlib import Path

    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist not installed")
    ds = load_dataset("fashion-mnist")
    assert len(ds.labels) == 70000 and ds.classes[9] == "Ankle boot"
    assert torch.bincount(ds.labels).tolist() == [7000] * 10


def _png_claiming(path: pathlib.Path, width: int, height: int) -> None:
    """A 1 x 1 PNG whose header (IHDR, its CRC fixed) declares ``width`` x ``height``: a few bytes that
    would decode to width x height x 3 bytes."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((1, 1, 3), dtype=np.uint8)).save(buffer, format="PNG")
    raw = bytearray(buffer.getvalue())
    start = raw.index(b"IHDR")
    raw[start + 4 : start + 12] = struct.pack(">II", width, height)
    raw[start + 17 : start + 21] = struct.pack(">I", zlib.crc32(bytes(raw[start : start + 17])))
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("side", [20_000, 2_000])  # past PIL's own bomb limit; past fedse's (1024 x 1024)
def test_image_readers_refuse_a_decompression_bomb_before_decoding(tmp_path, monkeypatch, side):
    from fedse.data.readers import read_images

    monkeypatch.setenv("FEDSE_CACHE", str(tmp_path / "cache"))
    _png_tree(tmp_path / "tree", "train", {"a": [1]})
    bomb = tmp_path / "tree" / "train" / "a" / "bomb.png"
    _png_claiming(bomb, side, side)
    assert bomb.stat().st_size < 100
    allowed = r"allowed: at most 1048576 pixels \(1024 x 1024"
    with pytest.raises(DatasetError, match=rf"bomb\.png: .*{allowed}"):
        read_images([bomb])
    with pytest.raises(DatasetError, match=rf"bomb\.png: .*{allowed}"):
        load_dataset("imagefolder", root=tmp_path / "tree")
    with tarfile.open(tmp_path / "cifar10-train.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "tree" / "train", arcname="cifar10/train")
    (tmp_path / "cifar10-test.tar.gz").write_bytes((tmp_path / "cifar10-train.tar.gz").read_bytes())
    with pytest.raises(DatasetError, match=rf"cifar10-t\w+\.tar\.gz:cifar10/train/a/bomb\.png: .*{allowed}"):
        load_dataset("cifar10", root=tmp_path)
    if side == 2_000:
        with pytest.raises(DatasetError, match=rf"bomb\.png: an image of 2000 x 2000 pixels; {allowed}"):
            read_images([bomb])


def test_only_natural_photographs_are_mirrored_unless_the_config_says_so(tmp_path):
    # The flip is the dataset's rule, not the image's colour: CIFAR-10 is mirrored; digits, MNIST,
    # Fashion-MNIST and image folders (road signs, text: unknown) are not, unless data.hflip says so.
    from fedse.config import config_from_dict

    rule = {name: hflip(config_from_dict({"data": {"dataset": name, "root": str(tmp_path)}}).data) for name in DATASETS}
    assert rule == {"digits": False, "mnist": False, "fashion-mnist": False, "cifar10": True, "imagefolder": False}
    forced = config_from_dict({"data": {"dataset": "imagefolder", "root": str(tmp_path), "hflip": True}})
    assert hflip(forced.data) is True
    assert hflip(config_from_dict({"data": {"dataset": "cifar10", "hflip": False}}).data) is False


def test_a_record_from_before_hflip_of_an_augmented_image_folder_must_say_which_flip_it_had(tmp_path):
    from fedse.config import ConfigError, config_from_record

    old = {"schema": 2, "data": {"dataset": "imagefolder", "root": str(tmp_path), "augment": True}}
    with pytest.raises(ConfigError, match=r"'data\.hflip': missing from a record .* --set data\.hflip=true"):
        config_from_record(old)
    assert config_from_record({**old, "data": {**old["data"], "hflip": True}}).data.hflip is True
    # any other old record: the dataset's rule is what it had
    assert config_from_record({"schema": 2, "data": {"dataset": "cifar10", "augment": True}}).data.hflip is None


def test_the_data_package_gives_exactly_the_readers_names():
    import fedse.data
    from fedse.data import readers

    assert set(fedse.data.__all__) == set(readers.__all__)
    assert all(getattr(fedse.data, n) is getattr(readers, n) for n in readers.__all__)


class _PastTheList:
    """numpy's own pickle of an object array whose state promises 100,000 items and holds one: handed to
    ``ndarray.__setstate__``, numpy reads past the list and the process crashes."""

    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct

        return _reconstruct, (np.ndarray, (0,), b"b"), (1, (100_000,), np.dtype("O"), False, [1])


def test_a_cifar_batch_of_numpy_globals_with_a_lying_state_is_refused_not_crashed(tmp_path):
    # Run in a child process: before the safe reader, this killed the interpreter (SIGSEGV).
    import subprocess
    import sys

    _cifar_batches(tmp_path, data_batch_1=pickle.dumps({b"data": _PastTheList(), b"labels": [1]}, protocol=4))
    code = (
        "from fedse.data.readers import DatasetError, load_dataset\n"
        f"try:\n    load_dataset('cifar10', root={str(tmp_path)!r})\n"
        "except DatasetError as err:\n    print(err)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "data_batch_1: the pickle holds an object array of 100000 items rebuilt from list data" in done.stdout
