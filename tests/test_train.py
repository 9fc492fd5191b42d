"""The one training loop: it learns, it respects `trainable`, frozen norms keep their statistics."""

import torch
from conftest import cpu_state

from fedse.models import create_model
from fedse.policies import create_policy
from fedse.train import TrainSpec, batches, evaluate, train

MEAN, STD = (0.5,), (0.25,)


def _toy(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    images = torch.randint(0, 100, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    images[labels == 1, :, :4] += 120  # class 1: bright upper half
    return images, labels


def test_batches_cover_once_and_drop_singleton_only_in_training():
    g = torch.Generator().manual_seed(0)
    got = torch.cat(list(batches(10, 4, g)))
    assert sorted(got.tolist()) == list(range(10))
    assert [len(b) for b in batches(9, 4, g)] == [4, 4]  # trailing single sample dropped
    assert [len(b) for b in batches(9, 4, None)] == [4, 4, 1]  # evaluation keeps it


def test_training_learns_a_separable_toy_problem():
    torch.manual_seed(0)
    model = create_model("se_resnet8", num_classes=2, in_channels=1, width=8)
    x, y = _toy()
    before = evaluate(model, x, y, mean=MEAN, std=STD)
    result = train(model, x, y, TrainSpec(mean=MEAN, std=STD, epochs=3, batch_size=32, lr=0.05, seed=0))
    after = evaluate(model, x, y, mean=MEAN, std=STD)
    assert result.num_examples == 3 * 256 and result.steps == 3 * 8
    assert after.accuracy > 0.9 and after.loss < before.loss


def test_only_trainable_parameters_move_and_frozen_norm_statistics_stay():
    torch.manual_seed(0)
    model = create_model("se_resnet8", num_classes=2, in_channels=1, width=8)
    split = create_policy("fedse").split(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _toy(64)
    train(
        model,
        x,
        y,
        TrainSpec(mean=MEAN, std=STD, epochs=1, batch_size=16, lr=0.1, seed=0),
        trainable=set(split.private),
    )
    after = cpu_state(model)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and moved <= set(split.private)  # BatchNorm running stats did not move either
    assert all(p.requires_grad for p in model.parameters())  # restored for the next caller


def test_full_training_moves_batchnorm_statistics():
    torch.manual_seed(0)
    model = create_model("se_resnet8", num_classes=2, in_channels=1, width=8)
    before = model.bn1.running_mean.clone()
    x, y = _toy(64)
    train(model, x, y, TrainSpec(mean=MEAN, std=STD, epochs=1, batch_size=16, lr=0.1, seed=0))
    assert not torch.equal(before, model.bn1.running_mean.cpu())


def test_proximal_term_pulls_towards_anchor():
    x, y = _toy(64)
    drift = {}
    for mu in (0.0, 10.0):
        torch.manual_seed(0)
        model = create_model("se_resnet8", num_classes=2, in_channels=1, width=8)
        anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
        train(
            model,
            x,
            y,
            TrainSpec(mean=MEAN, std=STD, epochs=2, batch_size=16, lr=0.05, proximal_mu=mu, seed=0),
            anchor=anchor,
        )
        drift[mu] = sum(((p.detach().cpu() - anchor[n]) ** 2).sum().item() for n, p in model.named_parameters())
    assert drift[10.0] < drift[0.0]


def test_same_seed_same_result():
    x, y = _toy(64)
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        model = create_model("se_resnet8", num_classes=2, in_channels=1, width=8)
        train(model, x, y, TrainSpec(mean=MEAN, std=STD, epochs=1, batch_size=16, lr=0.05, seed=3, augment=True))
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_lr_scale_sets_a_per_parameter_learning_rate():
    torch.manual_seed(0)
    model = create_model("se_resnet8", num_classes=2, in_channels=1, width=8)
    private = set(create_policy("fedse").split(model).private)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _toy(64)
    train(
        model,
        x,
        y,
        TrainSpec(mean=MEAN, std=STD, epochs=1, batch_size=16, lr=0.1, momentum=0.0, seed=0),
        lr_scale={k: 0.0 for k in private},
    )
    after = cpu_state(model)
    assert all(torch.equal(before[k], after[k]) for k in private)  # scale 0: frozen in place
    assert not torch.equal(before["conv1.weight"], after["conv1.weight"])


def test_bf16_autocast_runs_the_forward_pass_in_bfloat16_and_keeps_float32_weights():
    import copy

    import pytest

    torch.manual_seed(0)
    base = create_model("se_resnet8", num_classes=2, in_channels=1, width=8)
    x, y = _toy()
    seen = []
    runs = {}
    for bf16 in (False, True):
        model = copy.deepcopy(base)
        hook = model.fc.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        runs[bf16] = train(
            model, x, y, TrainSpec(mean=MEAN, std=STD, epochs=2, batch_size=32, lr=0.05, seed=0, bf16=bf16)
        )
        hook.remove()
        assert all(p.dtype == torch.float32 for p in model.parameters())
        runs[bf16, "acc"] = evaluate(model, x, y, mean=MEAN, std=STD).accuracy
    assert set(seen[: len(seen) // 2]) == {torch.float32} and set(seen[len(seen) // 2 :]) == {torch.bfloat16}
    assert runs[True].loss != runs[False].loss  # really in lower precision
    assert runs[True, "acc"] > 0.9  # and it still learns
    from fedse.privacy import SampleDP

    with pytest.raises(ValueError, match="bf16"):
        train(
            copy.deepcopy(base),
            x,
            y,
            TrainSpec(mean=MEAN, std=STD, epochs=1, batch_size=32, lr=0.05, bf16=True),
            dp=SampleDP(1.0, 1.0),
        )
