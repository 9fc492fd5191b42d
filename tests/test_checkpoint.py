"""A checkpoint is a file like any other: truncated, foreign or malformed ones are refused with
one clear error before anything runs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_config
from flwr.app import Array, ArrayRecord

from fedse.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fedse.report import RunLog

SHARED = {"w": torch.zeros(2), "b": torch.zeros(1)}


def _save(tmp_path, cfg, **override):
    save_checkpoint(tmp_path, cfg, 1, ArrayRecord({k: Array(v.numpy()) for k, v in SHARED.items()}), RunLog())
    if override:
        payload = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
        payload.update(override)
        payload = {k: v for k, v in payload.items() if v is not None}
        torch.save(payload, tmp_path / "checkpoint.pt")


def test_a_good_checkpoint_round_trips(tmp_path):
    cfg = tiny_config()
    _save(tmp_path, cfg)
    done, shared, log, ledger = load_checkpoint(tmp_path, cfg, SHARED)
    assert done == 1 and set(shared) == {"w", "b"} and log == RunLog() and ledger == ""


def test_truncated_checkpoint(tmp_path):
    cfg = tiny_config()
    _save(tmp_path, cfg)
    data = (tmp_path / "checkpoint.pt").read_bytes()
    (tmp_path / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable, truncated or not a fedse checkpoint"):
        load_checkpoint(tmp_path, cfg, SHARED)


@pytest.mark.parametrize(
    "override,pattern",
    [
        ({"log": None}, "expected the keys"),
        ({"extra": 1}, "expected the keys"),
        ({"round": 99}, r"round 99 is outside 1\.\.server\.rounds=2"),
        ({"round": "1"}, "round '1'"),
        ({"shared": {"w": torch.zeros(2)}}, "missing b"),
        ({"shared": {"w": torch.zeros(3), "b": torch.zeros(1)}}, r"w: \(3,\)"),
        ({"shared": {"w": torch.zeros(2, dtype=torch.float64), "b": torch.zeros(1)}}, "torch.float64"),
        ({"shared": {"w": torch.tensor([float("nan"), 0.0]), "b": torch.zeros(1)}}, "w: NaN or inf"),
        ({"log": {"train": {"1": "x"}}}, "malformed run log"),
        ({"log": {"bogus": 1}}, "malformed run log"),
        ({"accountant": "{}"}, "privacy accountant does not match"),
    ],
)
def test_malformed_checkpoint_is_refused_naming_the_problem(tmp_path, override, pattern):
    cfg = tiny_config()
    _save(tmp_path, cfg, **override)
    with pytest.raises(CheckpointError, match=pattern):
        load_checkpoint(tmp_path, cfg, SHARED)


def test_checkpoint_of_another_configuration(tmp_path):
    cfg = tiny_config()
    _save(tmp_path, cfg)
    other = dataclasses.replace(cfg, seed=7)
    with pytest.raises(CheckpointError, match=r"differs from the checkpoint's in \['seed'\]"):
        load_checkpoint(tmp_path, other, SHARED)
    # server.* may change on resume
    more = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, rounds=5))
    assert load_checkpoint(tmp_path, more, SHARED)[0] == 1


def test_a_checkpoint_from_before_a_default_changed_is_not_resumed_under_the_new_one(tmp_path):
    """A checkpoint's config without a schema predates schemas: the prior smoothing it lacks was add-one,
    so resuming it under today's default (16) is refused, not silently continued with another prior."""
    cfg = tiny_config(personalization={"policy": "fedse-la"})
    _save(tmp_path, cfg)
    payload = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    old = {k: v for k, v in payload["config"].items() if k != "schema"}
    del old["personalization"]["prior_smoothing"]
    _save(tmp_path, cfg, config=old)
    with pytest.raises(CheckpointError, match=r"differs from the checkpoint's in \['personalization'\]"):
        load_checkpoint(tmp_path, cfg, SHARED)
    then = dataclasses.replace(cfg, personalization=dataclasses.replace(cfg.personalization, prior_smoothing=1.0))
    assert load_checkpoint(tmp_path, then, SHARED)[0] == 1
    _save(tmp_path, cfg, config={**old, "schema": 9})
    with pytest.raises(CheckpointError, match=r"its config is not valid .*'schema': 9"):
        load_checkpoint(tmp_path, cfg, SHARED)


def test_a_non_tensor_pickle_is_never_loaded(tmp_path):
    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "marker"), "w"))

    import pickle

    (tmp_path / "checkpoint.pt").write_bytes(pickle.dumps({"round": 1, "x": Evil()}))
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(tmp_path, tiny_config(), SHARED)
    assert not (tmp_path / "marker").exists()
