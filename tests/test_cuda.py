"""fedse on CUDA: what only a GPU machine can check (every test skips without one).

The rest of the suite runs on CUDA too where it is present (``default_device``), so a GPU
machine runs it whole; these tests pin what differs there: the placement of DP-SGD's noise,
bit-for-bit reproducibility under cuDNN, and agreement with the CPU.
"""

from __future__ import annotations

import pytest
import torch
from conftest import cpu_state

from fedse.data.transforms import normalize
from fedse.models import create_model
from fedse.per_sample import layer_plan, per_sample_gradients
from fedse.privacy import SampleDP
from fedse.train import TrainSpec, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA = torch.device("cuda")
MEAN, STD = (0.5,) * 3, (0.25,) * 3


def _data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return images, torch.randint(0, 10, (n,), generator=g)


def _model(norm: str = "batchnorm") -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("se_resnet8", num_classes=10, in_channels=3, image_size=32, width=8, norm=norm)


def test_training_on_cuda_matches_cpu():
    x, y = _data()
    results = []
    for device in (torch.device("cpu"), CUDA):
        torch.manual_seed(0)
        model = create_model("se_resnet8", num_classes=10, in_channels=3, image_size=32)
        results.append(
            train(model, x, y, TrainSpec(mean=MEAN, std=STD, epochs=1, batch_size=32, lr=0.05), device=device)
        )
    assert results[0].num_examples == results[1].num_examples == 64
    assert results[1].loss == pytest.approx(results[0].loss, rel=1e-3)


def test_same_seed_same_weights_on_cuda_and_cudnn_flag_restored():
    x, y = _data()
    torch.backends.cudnn.deterministic = False
    states = []
    for _ in range(2):
        model = _model()
        train(
            model,
            x,
            y,
            TrainSpec(mean=MEAN, std=STD, epochs=2, batch_size=16, lr=0.05, seed=3, augment=True),
            device=CUDA,
        )
        states.append(cpu_state(model))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert torch.backends.cudnn.deterministic is False  # the caller's setting, back after training


def test_dp_sgd_trains_on_cuda_with_fresh_noise_on_the_device():
    # Opacus draws the noise with torch.normal on the parameter's device: a host generator there
    # fails ("Expected a 'cuda' device type for generator"). Two runs from the same seed differ
    # (the noise is seeded from the OS), and each step is counted.
    x, y = _data()
    states, dps = [], []
    for _ in range(2):
        model, dp = _model("groupnorm"), SampleDP(noise_multiplier=1.0, max_grad_norm=1.0)
        result = train(
            model, x, y, TrainSpec(mean=MEAN, std=STD, epochs=1, batch_size=16, lr=0.05, seed=0), dp=dp, device=CUDA
        )
        assert result.steps == 4 and next(model.parameters()).device.type == "cuda"
        states.append(cpu_state(model))
        dps.append(dp)
    assert all(sum(step[2] for step in dp.accountant.history) == 4 for dp in dps)
    assert any(not torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_per_sample_gradients_by_layer_on_cuda_match_the_cpu():
    # The grouped convolution backward that gives each example's weight gradient runs on cuDNN
    # there; TF32 is off for the comparison (float32 on both sides).
    x, y = _data(12)
    x = normalize(x, MEAN, STD)
    model = _model("groupnorm")
    names = [n for n, _ in model.named_parameters()]
    assert layer_plan(model, names) is not None

    def criterion(out, labels):
        return torch.nn.functional.cross_entropy(out, labels), out

    on_cpu, _, _ = per_sample_gradients(model, names, x, y, criterion)
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        on_cuda, _, _ = per_sample_gradients(model.to(CUDA), names, x.to(CUDA), y.to(CUDA), criterion)
    finally:
        torch.backends.cudnn.allow_tf32 = before
    for n in names:
        torch.testing.assert_close(on_cuda[n].cpu(), on_cpu[n], rtol=1e-4, atol=1e-6)
