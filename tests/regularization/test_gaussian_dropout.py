"""GaussianDropout: the noise's mean and variance on large tensors, eval, sharing, MC mode, gradients, errors."""

from __future__ import annotations

import math

import pytest
import torch

from ml_optim_plugins import GaussianDropout
from ml_optim_plugins.functional import gaussian_dropout

N = 2_000_000


@pytest.mark.parametrize("p", [0.05, 0.1, 0.3, 0.5, 0.8])
def test_noise_has_mean_one_and_variance_p_over_one_minus_p(p):
    torch.manual_seed(0)
    y = GaussianDropout(p).train()(torch.ones(N))
    variance = p / (1 - p)  # Keras: stddev = sqrt(rate / (1 - rate))
    # standard errors on 2e6 samples: mean sd/sqrt(N) ~ 1e-3 * sd; variance ~ sqrt(2/N) * var ~ 1e-3 * var
    assert y.mean().item() == pytest.approx(1.0, abs=6 * math.sqrt(variance / N))
    assert y.var().item() == pytest.approx(variance, rel=6 * math.sqrt(2 / N))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_same_first_two_moments_as_bernoulli_dropout(p):
    torch.manual_seed(1)
    x = torch.ones(N)
    gaussian, bernoulli = GaussianDropout(p)(x), torch.nn.Dropout(p)(x)
    assert gaussian.mean().item() == pytest.approx(bernoulli.mean().item(), abs=0.01)
    assert gaussian.var().item() == pytest.approx(bernoulli.var().item(), rel=0.01)


def test_eval_and_zero_rate_are_the_identity():
    x = torch.randn(64, 32)
    assert GaussianDropout(0.4).eval()(x) is x
    assert GaussianDropout(0.0).train()(x) is x


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, True, "0.1"])
def test_bad_rate_is_rejected_with_the_value(p):
    with pytest.raises(ValueError, match=r"p must be a dropout rate in \[0, 1\), got"):
        GaussianDropout(p)
    if p == 1.0:
        with pytest.raises(ValueError, match="infinite noise variance"):
            GaussianDropout(p)


@pytest.mark.parametrize("shared_dims, noise_shape", [((2, 3), (8, 16, 1, 1)), ((-1,), (8, 16, 5, 1)), ((0, 1), (1, 1, 5, 7))])
def test_noise_is_shared_along_the_chosen_dimensions(shared_dims, noise_shape):
    x = torch.ones(8, 16, 5, 7)
    noise = GaussianDropout(0.3, shared_dims=shared_dims)(x)
    reduced = noise
    for dim in shared_dims:
        assert torch.equal(noise, noise.select(dim, 0).unsqueeze(dim).expand_as(noise))
        reduced = reduced.select(dim, 0).unsqueeze(dim)
    assert reduced.shape == noise_shape and reduced.unique().numel() == math.prod(noise_shape)


def test_mc_mode_keeps_the_noise_in_eval_and_averages_to_the_input():
    torch.manual_seed(0)
    layer = GaussianDropout(0.3, mc=True).eval()
    x = torch.randn(16, 8)
    samples = torch.stack([layer(x) for _ in range(4000)])
    assert not torch.equal(samples[0], samples[1])
    assert samples.mean(0) == pytest.approx(x, abs=0.05)


def test_gradient_is_the_noise_and_passes_gradcheck():
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)

    def fixed_noise(inp):
        return gaussian_dropout(inp, 0.3, generator=torch.Generator().manual_seed(7))

    assert torch.autograd.gradcheck(fixed_noise, (x,))
    y = fixed_noise(x)
    y.sum().backward()
    assert torch.allclose(x.grad, y.detach() / x.detach())


def test_exposes_p_like_nn_dropout():
    layer = GaussianDropout(0.25, shared_dims=(1,))
    assert layer.p == 0.25 and "shared_dims=(1,)" in repr(layer)
