"""A checkpoint is a file like any other: truncated, foreign or malformed ones are refused with
one clear error before anything runs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_config
from flwr.app import Array, ArrayRecord

from fedse.analysis.report import RunLog
from fedse.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from fedse.privacy import make_client_dp

SHARED = {"w": torch.zeros(2), "b": torch.zeros(1)}


def _save(tmp_path, cfg, **override):
    save_checkpoint(tmp_path, cfg, 1, ArrayRecord({k: Array(v.numpy()) for k, v in SHARED.items()}), RunLog())
    if override:
        payload = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
        payload.update(override)
        payload = {k: v for k, v in payload.items() if v is not None}
        torch.save(payload, tmp_path / "checkpoint.pt")


def _random(shape, dtype, gen):
    """A seeded random tensor of ``shape`` and ``dtype`` (values over the dtype's range, not zeros)."""
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * 3).to(dtype)
    low, high = {torch.int64: (-(2**40), 2**40), torch.uint8: (0, 256), torch.bool: (0, 2)}[dtype]
    return torch.randint(low, high, shape, generator=gen, dtype=torch.int64).to(dtype)


# shared weights of several shapes and dtypes, as a state_dict holds them: conv and linear weights, a
# float64 and a float16 tensor, BatchNorm's 0-d int64 counter, uint8 and bool buffers
SHAPES = {
    "conv.weight": ((4, 1, 3, 3), torch.float32),
    "fc.bias": ((5,), torch.float32),
    "scale": ((2, 3), torch.float64),
    "half": ((3, 2), torch.float16),
    "bn.num_batches_tracked": ((), torch.int64),
    "lut": ((7,), torch.uint8),
    "mask": ((2, 2), torch.bool),
}


def test_a_good_checkpoint_round_trips(tmp_path):
    cfg = tiny_config(server={"rounds": 3}, privacy={"mode": "client", "clipping_norm": 1.0, "noise_multiplier": 1.3})
    gen = torch.Generator().manual_seed(1234)
    weights = {k: _random(shape, dtype, gen) for k, (shape, dtype) in SHAPES.items()}
    moments = {name: {k: _random(v.shape, v.dtype, gen) for k, v in weights.items()} for name in ("m_t", "v_t")}
    strategy = {"clipping_norm": 0.8125, **moments}
    log = RunLog(
        train={1: {0: {"train-loss": 0.5, "num-examples": 30}, 2: {"train-loss": 0.25}}, 2: {1: {"train-acc": 0.75}}},
        evaluate={2: {0: {"test-acc": 0.875, "num-examples": 12}}},
        dropped=[{"node-id": 7, "client": None, "problems": ["num-examples 0"]}],
        failed=[{"node-id": 9, "client": 1, "reason": "boom"}],
        refused=[{"round": 1, "reason": "2 usable replies"}],
        round_seconds={1: 1.25, 2: 0.5},
        epsilon={1: 0.5, 2: 0.75},
    )
    manifest = {"0": {"round": 2, "sha256": "ab" * 32, "file": "0.pt"}, "2": {"round": 1, "sha256": "cd" * 32}}
    dp = make_client_dp(cfg, 3, 3)
    dp.release()
    dp.release()
    save_checkpoint(
        tmp_path,
        cfg,
        2,
        ArrayRecord({k: Array(v.numpy()) for k, v in weights.items()}),
        log,
        dp,
        strategy=strategy,
        private=manifest,
        finished=True,
    )
    ckpt = load_checkpoint(tmp_path, cfg, {k: torch.zeros_like(v) for k, v in weights.items()})

    def same(got, want):
        assert list(got) == list(want)
        for k, v in want.items():
            assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v), k

    # every field of the checkpoint (a new field fails here until it is compared below), each exactly
    fields = ["round", "shared", "log", "accountant", "strategy", "private", "finished"]
    assert [f.name for f in dataclasses.fields(Checkpoint)] == fields
    assert ckpt.round == 2
    same(ckpt.shared, weights)
    assert ckpt.log == log
    assert ckpt.accountant == dp.state()
    restored = make_client_dp(cfg, 3, 3)
    restored.load_state(ckpt.accountant)
    assert restored.releases == 2 and restored.epsilon() == dp.epsilon() > 0
    assert set(ckpt.strategy) == {"clipping_norm", "m_t", "v_t"} and ckpt.strategy["clipping_norm"] == 0.8125
    same(ckpt.strategy["m_t"], moments["m_t"])
    same(ckpt.strategy["v_t"], moments["v_t"])
    assert ckpt.private == manifest
    assert ckpt.finished is True
    assert (tmp_path / "checkpoint.pt").stat().st_mode & 0o777 == 0o600


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
        ({"round": 99}, r"it has run 99 rounds, more than server\.rounds=2"),
        ({"round": "1"}, "round '1'"),
        ({"round": 0}, "round 0 is not a round number"),
        ({"private": {"x": {"round": 1}}}, "malformed private-state manifest"),
        ({"finished": "yes"}, "malformed finished flag 'yes'"),
        ({"strategy": {"clipping_norm": float("nan")}}, r"clipping_norm nan"),
        ({"strategy": {"m_t": {"w": torch.zeros(5)}}}, "m_t does not fit the shared weights"),
        ({"strategy": {"m_t": "x"}}, "m_t is not a mapping of finite tensors"),
        ({"strategy": {"bogus": 1}}, r"keys \['bogus'\]"),
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
    with pytest.raises(CheckpointError, match=r"differs from the checkpoint's in seed: 0 -> 7"):
        load_checkpoint(tmp_path, other, SHARED)
    # server.* may change on resume
    more = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, rounds=5))
    assert load_checkpoint(tmp_path, more, SHARED).round == 1


def test_a_checkpoint_from_before_a_default_changed_is_not_resumed_under_the_new_one(tmp_path):
    """A checkpoint's config without a schema predates schemas: the prior smoothing it lacks was add-one,
    so resuming it under today's default (16) is refused, not silently continued with another prior."""
    cfg = tiny_config(personalization={"policy": "fedse-la"})
    _save(tmp_path, cfg)
    payload = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    old = {k: v for k, v in payload["config"].items() if k != "schema"}
    del old["personalization"]["prior_smoothing"]
    _save(tmp_path, cfg, config=old)
    smoothing = r"differs from the checkpoint's in personalization\.prior_smoothing: 1\.0 -> 16\.0"
    with pytest.raises(CheckpointError, match=smoothing):
        load_checkpoint(tmp_path, cfg, SHARED)
    then = dataclasses.replace(cfg, personalization=dataclasses.replace(cfg.personalization, prior_smoothing=1.0))
    assert load_checkpoint(tmp_path, then, SHARED).round == 1
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


def test_a_dp_run_extends_only_when_its_noise_was_not_sized_for_its_rounds(tmp_path):
    """With privacy.noise_multiplier the accountant counts every release, so a resume may add rounds;
    with privacy.target_epsilon sigma was calibrated to reach it in server.rounds, so it may not."""

    def dp_run(privacy):
        cfg = tiny_config(server={"rounds": 2}, privacy={"mode": "client", "clipping_norm": 1.0, **privacy})
        dp = make_client_dp(cfg, 3, 3)
        shared = ArrayRecord({k: Array(v.numpy()) for k, v in SHARED.items()})
        save_checkpoint(tmp_path, cfg, 1, shared, RunLog(), dp)
        return cfg, dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, rounds=4))

    _, more = dp_run({"noise_multiplier": 1.0})
    assert load_checkpoint(tmp_path, more, SHARED).round == 1
    _, more = dp_run({"target_epsilon": 8.0})
    with pytest.raises(CheckpointError, match=r"sized to reach privacy.target_epsilon=8.0 in server.rounds=2"):
        load_checkpoint(tmp_path, more, SHARED)
