"""Differential privacy: DP step == plain step without noise, model check, cumulative epsilon,
pinned epsilon, client-level clipping bound, no private key leaves."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import cpu_state, tiny_config
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from opacus.accountants import RDPAccountant

from fedse.config import ConfigError, config_to_dict
from fedse.data.federated import build_federated_data
from fedse.data.transforms import normalize
from fedse.federation.client import make_client_app
from fedse.models import build_model, create_model
from fedse.policies import create_policy
from fedse.privacy import (
    PoissonBatches,
    SampleDP,
    check_dp_model,
    client_level_epsilon,
    epsilon_of,
    poisson_rate,
    sample_noise_multiplier,
)
from fedse.records import CONFIG_JSON, to_arrays
from fedse.state import load_accountant
from fedse.train import TrainSpec, default_device, train

MEAN, STD = (0.5,), (0.25,)
BIAS = torch.tensor([0.7, -1.2, 0.1])  # a fixed logit offset (a label prior)
# DP step against plain step: float32 rounding on the CPU. On CUDA cuDNN convolves in TF32 by
# default (10-bit mantissa): the two summation orders then differ by up to ~1e-3 relative, 5e-6
# absolute (measured on an H200), so the bound there is absolute.
CLOSE = {"rtol": 1e-5, "atol": 1e-6} if default_device().type == "cpu" else {"rtol": 1e-3, "atol": 1e-5}


def _criterion(out, y):
    logits = out + BIAS
    return F.cross_entropy(logits, y), logits


def _frozen(name):
    """A frozen subset: the stem and the first stage's convolutions and norms (its SE block trains)."""
    return name.startswith(("conv1", "bn1")) or (name.startswith("layer1.") and ".se." not in name)


def _data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8), torch.randint(0, 3, (n,), generator=g)


def test_dp_step_without_noise_and_with_loose_clipping_equals_plain_step():
    x, y = _data()
    models = []
    for dp in (None, SampleDP(noise_multiplier=0.0, max_grad_norm=1e6)):
        torch.manual_seed(0)
        model = create_model("se_resnet8", num_classes=3, in_channels=1, width=8, norm="groupnorm")
        # batch = n: Poisson rate 1 includes every example, so both take one full-batch step.
        train(
            model, x, y, TrainSpec(mean=MEAN, std=STD, epochs=1, batch_size=len(y), lr=0.1, momentum=0.0, seed=0), dp=dp
        )
        models.append(cpu_state(model))
    for key in models[0]:
        torch.testing.assert_close(models[0][key], models[1][key], **CLOSE)


def test_dp_step_equals_plain_step_with_frozen_subset_lr_groups_momentum_and_logit_bias():
    x, y = _data()
    states = []
    for dp in (None, SampleDP(noise_multiplier=0.0, max_grad_norm=1e6)):
        torch.manual_seed(0)
        model = create_model("se_resnet8", num_classes=3, in_channels=1, width=8, norm="groupnorm")
        before = {k: v.clone() for k, v in model.state_dict().items()}
        trainable = {n for n, _ in model.named_parameters() if not _frozen(n)}
        lr_scale = {n: 3.0 for n in trainable if ".se." in n}
        spec = TrainSpec(
            mean=MEAN, std=STD, epochs=3, batch_size=len(y), lr=0.05, momentum=0.9, weight_decay=5e-4, seed=0
        )
        train(model, x, y, spec, trainable=trainable, lr_scale=lr_scale, dp=dp, logit_bias=BIAS)
        state = cpu_state(model)
        for name, _ in model.named_parameters():
            assert torch.equal(state[name], before[name]) == (name not in trainable), name
        states.append(state)
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], **CLOSE)


def test_dp_phase_puts_no_hooks_on_the_model_and_takes_a_noise_step_on_an_empty_batch():
    x, y = _data()
    model = create_model("se_resnet8", num_classes=3, in_channels=1, width=8, norm="groupnorm")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dp = SampleDP(noise_multiplier=1.0, max_grad_norm=1.0)
    with dp.phase(model, optimizer, x, y, 16, _criterion) as (step, loader):
        assert not any(m._forward_hooks or m._backward_hooks or m._forward_pre_hooks for m in model.modules())
        loss, logits = step(normalize(x[:0], MEAN, STD), y[:0])
        assert loss is None and logits is None
        assert dp.state()["history"] == [[1.0, 1 / len(loader), 1]]  # counted like any step
        assert all(not torch.equal(v, before[k]) for k, v in model.state_dict().items())  # noise moved all
        loss, logits = step(normalize(x, MEAN, STD), y)
        assert logits.shape == (len(y), 3) and loss.ndim == 0
    assert dp.state()["history"] == [[1.0, 1 / 3, 2]]
    assert not any(hasattr(p, "grad_sample") or hasattr(p, "summed_grad") for p in model.parameters())


def test_poisson_batches_sample_as_opacus_dp_data_loader():
    # Opacus's DPDataLoader's rate and step count, and its sampler's draws, batch for batch (the
    # loader itself also draws a worker seed from the generator each epoch, so its stream is
    # shifted): the same examples in the same order, empty batches included, with the tensors'
    # other dimensions.
    from opacus.data_loader import DPDataLoader
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler
    from torch.utils.data import DataLoader, TensorDataset

    x, y = _data(n=10)
    ours = PoissonBatches(x, y, 3, torch.Generator().manual_seed(5))
    loader = DPDataLoader.from_data_loader(DataLoader(TensorDataset(x, y), batch_size=3))
    assert (len(ours), ours.sample_rate) == (len(loader), loader.sample_rate) == (4, 0.25)
    sampler = UniformWithReplacementSampler(
        num_samples=10, sample_rate=0.25, generator=torch.Generator().manual_seed(5)
    )
    sizes = []
    for _ in range(5):
        for (xa, ya), index in zip(ours, sampler, strict=True):
            assert torch.equal(xa, x[index]) and torch.equal(ya, y[index])
            assert xa.shape[1:] == x.shape[1:] and xa.dtype == x.dtype and ya.dtype == y.dtype
            sizes.append(len(ya))
    assert 0 in sizes and max(sizes) > 3


def test_dp_with_tight_clipping_differs_from_plain():
    x, y = _data()
    states = []
    for dp in (None, SampleDP(noise_multiplier=0.0, max_grad_norm=1e-3)):
        torch.manual_seed(0)
        model = create_model("se_resnet8", num_classes=3, in_channels=1, width=8, norm="groupnorm")
        train(
            model, x, y, TrainSpec(mean=MEAN, std=STD, epochs=1, batch_size=len(y), lr=0.1, momentum=0.0, seed=0), dp=dp
        )
        states.append(model.state_dict()["fc.weight"])
    assert not torch.allclose(states[0], states[1])


def test_batchnorm_model_with_dp_is_a_clear_error():
    # Names what is wrong and the fix (the one test of this refusal; test_models checks GroupNorm itself).
    with pytest.raises(ConfigError, match=r"BatchNorm.*use --set model\.norm=groupnorm"):
        check_dp_model(create_model("se_resnet8", num_classes=10, norm="batchnorm"))
    check_dp_model(create_model("se_resnet8", num_classes=10, norm="groupnorm"))


def test_pinned_rdp_epsilon():
    # sigma 1.0, sample rate 0.01, 1000 steps, delta 1e-5 (Opacus RDP accountant).
    assert epsilon_of([(1.0, 0.01, 1000)], 1e-5, "rdp") == pytest.approx(2.1013652716, abs=1e-9)
    assert epsilon_of([], 1e-5) == 0.0 and math.isinf(client_level_epsilon(0.0, 5, 1e-5))
    assert client_level_epsilon(1.0, 0, 1e-5) == 0.0


def test_target_epsilon_gives_a_noise_multiplier_that_reaches_it():
    cfg = tiny_config(
        model={"norm": "groupnorm"}, server={"rounds": 4}, privacy={"mode": "sample", "target_epsilon": 3.0}
    )
    sigma = sample_noise_multiplier(cfg, 300, private_first=False)
    q, steps = poisson_rate(300, cfg.train.batch_size)
    eps = epsilon_of([(sigma, q, 4 * steps)], cfg.privacy.delta)
    assert 2.9 < eps <= 3.0 + 1e-6
    # A private-first policy (FedRep) takes private_epochs more DP steps per round: more noise for the same budget.
    assert sample_noise_multiplier(cfg, 300, private_first=True) > sigma


def _msg(cfg, arrays, rnd):
    record = ConfigRecord({CONFIG_JSON: json.dumps(config_to_dict(cfg)), "server-round": rnd})
    return Message(RecordDict({"arrays": arrays, "config": record}), dst_node_id=3, message_type=MessageType.TRAIN)


def test_epsilon_accumulates_over_rounds_and_matches_the_accountant(task_identity):
    cfg = tiny_config(model={"norm": "groupnorm"}, privacy={"mode": "sample", "noise_multiplier": 1.2})
    fed = build_federated_data(cfg)
    ds = fed.dataset
    model = build_model(cfg, ds.num_classes, ds.channels, ds.image_size)
    split = create_policy("fedse").split(model)
    app = make_client_app()
    ctx = Context(run_id=1, node_id=3, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    shared = to_arrays(split.shared_state(model))
    r1 = app(_msg(cfg, shared, 1), ctx)
    r2 = app(_msg(cfg, r1.content["arrays"], 2), ctx)
    eps1, eps2 = r1.content["metrics"]["dp-epsilon"], r2.content["metrics"]["dp-epsilon"]
    assert 0 < eps1 < eps2
    # The accountant's figure for the combined steps of both rounds, computed independently.
    q, steps = poisson_rate(len(fed.shard(0).train_labels), cfg.train.batch_size)
    accountant = RDPAccountant()
    for _ in range(2 * steps):
        accountant.step(noise_multiplier=1.2, sample_rate=q)
    assert eps2 == pytest.approx(accountant.get_epsilon(cfg.privacy.delta), rel=1e-12)
    assert load_accountant(ctx) == {"history": [[1.2, q, 2 * steps]], "mechanism": "rdp"}  # Opacus's state_dict
    # Under DP no statistic of the training data is sent, and no private key.
    assert set(r2.content["metrics"].keys()) == {"num-examples", "dp-epsilon"}
    assert set(r2.content["arrays"].keys()) == set(split.shared)


def test_client_with_batchnorm_and_sample_dp_refuses(task_identity):
    cfg = tiny_config(privacy={"mode": "sample", "noise_multiplier": 1.0})
    ds = build_federated_data(cfg).dataset
    model = build_model(cfg, ds.num_classes, ds.channels, ds.image_size)
    split = create_policy("fedse").split(model)
    ctx = Context(run_id=1, node_id=3, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    with pytest.raises(ConfigError, match="groupnorm"):
        make_client_app()(_msg(cfg, to_arrays(split.shared_state(model)), 1), ctx)


@pytest.mark.parametrize(
    "raw,pattern",
    [
        ({"privacy": {"mode": "sample"}}, "exactly one of privacy.noise_multiplier or privacy.target_epsilon"),
        ({"privacy": {"mode": "client", "noise_multiplier": 1.0, "target_epsilon": 2.0}}, "exactly one"),
        ({"privacy": {"mode": "sample", "noise_multiplier": 1.0}, "server": {"strategy": "fedprox"}}, "fedprox"),
        ({"privacy": {"mode": "laplace"}}, "'privacy.mode'"),
        ({"privacy": {"delta": 0}}, r"'privacy\.delta': 0\.0 is out of range"),
    ],
)
def test_privacy_config_errors(raw, pattern):
    from fedse.config import config_from_dict
    from fedse.spec import resolve

    with pytest.raises(ConfigError, match=pattern):
        resolve(config_from_dict(raw))


@pytest.mark.slow
def test_client_level_updates_are_clipped_to_the_bound(tmp_path):
    from fedse.simulation import simulate

    bound = 0.5
    cfg = tiny_config(
        server={"rounds": 2},
        output={"dir": str(tmp_path), "name": "cdp"},
        privacy={"mode": "client", "noise_multiplier": 1e-6, "clipping_norm": bound},
    )
    result = simulate(cfg, quiet=True)
    rows = [r for rnd in result.outcome.log.train.values() for r in rnd.values()]
    assert len(rows) == 6 and not result.outcome.log.failed
    assert any(r["update-norm"] > bound for r in rows)  # clipping had work to do
    assert all(r["update-norm-aggregated"] <= bound * (1 + 1e-5) for r in rows)
    assert result.outcome.summary["privacy"]["mode"] == "client"
