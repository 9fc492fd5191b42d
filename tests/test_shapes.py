"""A server that holds no data: the model's shape from the config; classes numbered alike on every client."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fedse.config import config_from_dict
from fedse.data.federated import build_federated_data, model_shape, own_data
from fedse.data.readers import DatasetError, load_dataset


def test_model_shape_comes_from_the_config_without_reading_data(monkeypatch):
    import fedse.data.federated

    monkeypatch.setattr(fedse.data.federated, "load_dataset", lambda *a, **k: pytest.fail("data was read"))
    assert model_shape(config_from_dict({"data": {"dataset": "fashion-mnist"}})) == (10, 1, 28)
    assert model_shape(config_from_dict({"data": {"dataset": "cifar10"}})) == (10, 3, 32)
    assert model_shape(config_from_dict({"data": {"dataset": "digits"}})) == (10, 1, 8)
    own = {"data": {"dataset": "imagefolder", "root": "/nowhere", "classes": ["cat", "dog", "fox"]}}
    assert model_shape(config_from_dict({**own, "model": {"in_channels": 3, "image_size": 16}})) == (3, 3, 16)
    with pytest.raises(ValueError, match="implies no model shape: set model.num_classes"):
        model_shape(config_from_dict({"data": {"dataset": "imagefolder", "root": "/nowhere"}}))


def test_data_of_another_shape_is_refused():
    cfg = config_from_dict({"model": {"num_classes": 12}})  # digits has 10
    with pytest.raises(ValueError, match="the data has 10 classes, 1 channels, 8x8 images, but the run's model"):
        model_shape(cfg, build_federated_data(cfg).dataset)
    fine = config_from_dict({"model": {"num_classes": 10, "in_channels": 1, "image_size": 8}})
    assert model_shape(fine, build_federated_data(fine).dataset) == (10, 1, 8)


PIXEL = {"ant": 0, "bee": 100, "cat": 200, "dog": 50}  # each class's images are recognisable by value


def _folder(root, classes, per_class=3):
    for name in classes:
        (root / "train" / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((6, 6), PIXEL[name] + i, np.uint8)).save(root / "train" / name / f"{i}.png")


def test_a_client_missing_a_class_folder_keeps_every_label(tmp_path):
    classes = ["ant", "bee", "cat"]
    _folder(tmp_path / "a", ["ant", "cat"])  # no 'bee': without the config's classes 'cat' would be label 1
    data = load_dataset("imagefolder", tmp_path / "a", classes=classes)
    assert data.classes == tuple(classes)
    assert sorted(set(data.labels.tolist())) == [0, 2]
    assert data.images[data.labels == 2].float().mean() == 201  # label 2 holds the 'cat' images (200 + i)
    assert data.images[data.labels == 0].float().mean() == 1
    cfg = config_from_dict({"data": {"dataset": "imagefolder", "root": str(tmp_path / "a"), "classes": classes}})
    assert own_data(cfg, tmp_path / "a").dataset.classes == tuple(classes)
    _folder(tmp_path / "b", ["ant", "dog"])
    with pytest.raises(DatasetError, match=r"class folders \['dog'\] are not among the run's classes"):
        load_dataset("imagefolder", tmp_path / "b", classes=classes)
    with pytest.raises(DatasetError, match="data.classes .* differ from mnist's classes"):
        load_dataset("mnist", tmp_path, classes=["x", "y"])
