"""Variational Gaussian dropout: the published KL approximations, clipping, the noise per unit, the sparse linear
layer (local reparameterisation, pruning, gradients) and the VariationalKL callback."""

from __future__ import annotations

import math

import pytest
import torch

from ml_optim_plugins import VariationalGaussianDropout, VariationalKL
from ml_optim_plugins.regularization import VariationalLinear
from ml_optim_plugins.functional import kl_kingma, kl_molchanov, variational_kl

LOG_ALPHAS = [-6.0, -3.0, -1.0, -0.2, 0.0, 1.0, 3.0, 6.0]


def published_kingma(log_alpha: float) -> float:
    """Kingma, Salimans & Welling 2015, eq. (7), without the constant: KL = -(0.5 ln a + c1 a + c2 a^2 + c3 a^3)."""
    a = math.exp(log_alpha)
    return -(0.5 * log_alpha + 1.16145124 * a - 1.50204118 * a**2 + 0.58629921 * a**3)


def published_molchanov(log_alpha: float) -> float:
    """Molchanov, Ashukha & Vetrov 2017, eq. (14): -KL = k1 sigm(k2 + k3 ln a) - 0.5 ln(1 + 1/a) - k1."""
    k1, k2, k3 = 0.63576, 1.87320, 1.48695
    neg_kl = k1 / (1 + math.exp(-(k2 + k3 * log_alpha))) - 0.5 * math.log1p(math.exp(-log_alpha)) - k1
    return -neg_kl


@pytest.mark.parametrize("log_alpha", LOG_ALPHAS)
def test_kl_approximations_match_the_papers(log_alpha):
    t = torch.tensor(log_alpha, dtype=torch.float64)
    assert kl_kingma(t).item() == pytest.approx(published_kingma(log_alpha), rel=1e-12)
    assert kl_molchanov(t).item() == pytest.approx(published_molchanov(log_alpha), rel=1e-12)


def test_molchanov_kl_is_positive_and_vanishes_for_large_alpha():
    values = kl_molchanov(torch.linspace(-8, 8, 50))
    assert (values > 0).all() and (values[1:] < values[:-1]).all() and values[-1] < 1e-3


def test_kingma_layer_clips_alpha_to_one_where_the_polynomial_holds():
    layer = VariationalGaussianDropout(4, kl_approximation="kingma")
    with torch.no_grad():
        layer.log_alpha.copy_(torch.tensor([-1.0, 0.0, 2.0, 5.0]))
    assert layer.clipped_log_alpha().tolist() == [-1.0, 0.0, 0.0, 0.0]
    assert layer.p.tolist() == pytest.approx([1 / (1 + math.e), 0.5, 0.5, 0.5])
    layer.kl().backward()
    assert layer.log_alpha.grad[2:].abs().sum() == 0 and layer.log_alpha.grad[0] != 0


def test_noise_variance_per_unit_is_alpha():
    torch.manual_seed(0)
    layer = VariationalGaussianDropout(3, dim=1, p_init=0.2, kl_approximation="molchanov")
    with torch.no_grad():
        layer.log_alpha.copy_(torch.log(torch.tensor([0.05, 0.25, 1.0])))
    y = layer.train()(torch.ones(200_000, 3, 2))
    assert y.mean((0, 2)).tolist() == pytest.approx([1, 1, 1], abs=0.01)
    assert y.var((0, 2)).tolist() == pytest.approx([0.05, 0.25, 1.0], rel=0.02)
    x = torch.randn(5, 3, 2)
    assert layer.eval()(x) is x


def test_linear_layer_samples_pre_activations_with_the_right_moments():
    torch.manual_seed(0)
    layer = VariationalLinear(4, 2)
    with torch.no_grad():
        layer.log_sigma2.fill_(-2.0)
    x = torch.randn(1, 4)
    samples = layer.train()(x.expand(200_000, 4))
    mean = x @ layer.weight.T + layer.bias
    var = (x**2) @ torch.exp(layer.log_sigma2).T
    samples = samples.detach()
    assert samples.mean(0).tolist() == pytest.approx(mean.squeeze(0).tolist(), abs=0.01)
    assert samples.var(0).tolist() == pytest.approx(var.squeeze(0).tolist(), rel=0.02)


def test_linear_layer_prunes_weights_above_the_threshold_in_eval():
    layer = VariationalLinear(4, 3, threshold=3.0)
    with torch.no_grad():
        layer.weight.fill_(0.5)
        layer.log_sigma2.fill_(-10.0)
        layer.log_sigma2[0, :2] = math.log(0.25) + 4.0  # log_alpha = 4 > 3
    assert layer.sparsity() == pytest.approx(2 / 12)
    x = torch.randn(5, 4)
    expected = torch.nn.functional.linear(x, layer.weight * layer.mask(), layer.bias)
    assert torch.equal(layer.eval()(x), expected) and layer.mask()[0, :2].sum() == 0


def test_linear_layer_gradients_pass_gradcheck_with_fixed_noise():
    layer = VariationalLinear(3, 2).double()
    with torch.no_grad():
        layer.log_sigma2.fill_(-3.0)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)

    def fixed_noise(inp, weight, log_sigma2):
        with torch.random.fork_rng():
            torch.manual_seed(3)
            params = {"weight": weight, "log_sigma2": log_sigma2, "bias": layer.bias}
            return torch.func.functional_call(layer.train(), params, (inp,))

    weight = layer.weight.detach().clone().requires_grad_()
    log_sigma2 = layer.log_sigma2.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(fixed_noise, (x, weight, log_sigma2))


def test_variational_kl_sums_every_layer():
    model = torch.nn.Sequential(VariationalLinear(4, 4), torch.nn.ReLU(), VariationalGaussianDropout(4))
    assert variational_kl(model).item() == pytest.approx((model[0].kl() + model[2].kl()).item())
    assert variational_kl(torch.nn.Linear(2, 2)).item() == 0.0


@pytest.mark.parametrize("kwargs, message", [
    ({"p_init": 0.0}, r"p_init must be a finite number in \(0, 1\)"),
    ({"kl_approximation": "exact"}, "kl_approximation='exact'; expected one of kingma, molchanov"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VariationalGaussianDropout(4, **kwargs)


def test_callback_weights_the_kl_by_the_dataset_size_with_warmup_and_logs(make_penalty_trainer):
    from tests.regularization.tiny_modules import Regression

    callback = VariationalKL(warmup_steps=4)
    model = Regression(variational=True)
    trainer = make_penalty_trainer(callbacks=[callback], max_steps=6)
    trainer.fit(model)
    assert callback.resolved_weight == pytest.approx(1 / 64)
    assert callback.current_weight(2) == pytest.approx(0.5 / 64) and callback.current_weight(10) == pytest.approx(1 / 64)
    logged = trainer.logged_metrics
    assert {"train/kl", "train/kl_weight", "train/sparsity"} <= set(logged)
    assert logged["train/kl"].item() == pytest.approx(variational_kl(model).item() / 64, rel=0.05)


def test_callback_needs_a_variational_layer(make_penalty_trainer):
    from tests.regularization.tiny_modules import Regression

    with pytest.raises(TypeError, match="found no variational layer"):
        make_penalty_trainer(callbacks=[VariationalKL()]).fit(Regression())


def test_sparse_variational_dropout_separates_irrelevant_inputs():
    """Only 4 of 24 inputs carry signal: the KL drives the noise of the other 20 weights up (log alpha towards the
    pruning threshold) while the 4 useful weights keep almost no noise."""
    torch.manual_seed(0)
    n = 512
    x = torch.randn(n, 24)
    y = x[:, :4] @ torch.tensor([[2.0], [-1.5], [1.0], [3.0]]) + 0.1 * torch.randn(n, 1)
    layer = VariationalLinear(24, 1)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
    for step in range(1500):
        optimizer.zero_grad()
        loss = (layer(x) - y).pow(2).mean() + min(1.0, step / 500) * layer.kl() / n
        loss.backward()
        optimizer.step()
    log_alpha = layer.log_alpha().detach()[0]
    assert log_alpha[:4].max() < -6 and layer.mask()[0, :4].tolist() == [1, 1, 1, 1]
    assert log_alpha[4:].min() > log_alpha[:4].max() + 4 and log_alpha[4:].mean() > 0.5
    assert layer.sparsity() > 0.05


def test_kingma_refuses_a_start_above_its_clip():
    with pytest.raises(ValueError, match="p_init=0.7 is above 0.5"):
        VariationalGaussianDropout(4, p_init=0.7)
    assert VariationalGaussianDropout(4, p_init=0.7, kl_approximation="molchanov").p.mean().item() == pytest.approx(0.7)


def test_kl_weight_needs_a_countable_training_set(make_penalty_trainer):
    from torch.utils.data import DataLoader, TensorDataset

    from tests.regularization.tiny_modules import Regression

    class TwoLoaders(Regression):
        def train_dataloader(self):
            data = TensorDataset(self.x, self.y)
            return {"a": DataLoader(data, batch_size=8), "b": DataLoader(data, batch_size=8)}

        def training_step(self, batch, batch_idx):
            return self.data_loss(*batch["a"])

    with pytest.raises(ValueError, match=r"cannot read that number from the training dataloader \(dict: several loaders"):
        make_penalty_trainer(callbacks=[VariationalKL()], max_steps=1).fit(TwoLoaders(variational=True))
