"""Variational Gaussian dropout with learned rates (Kingma, Salimans & Welling 2015) and its sparse variant
(Molchanov, Ashukha & Vetrov 2017): modules whose ``kl()`` is the KL term of the variational objective."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ml_optim_plugins.hyperparameters import check_number

# Kingma et al. 2015, eq. (7): -KL ~ const + 0.5 log a + c1 a + c2 a^2 + c3 a^3, fitted for a <= 1.
KINGMA_C1, KINGMA_C2, KINGMA_C3 = 1.16145124, -1.50204118, 0.58629921
# Molchanov et al. 2017, eq. (14): -KL ~ k1 sigmoid(k2 + k3 log a) - 0.5 log(1 + 1/a) + C, C = -k1, for any a.
MOLCHANOV_K1, MOLCHANOV_K2, MOLCHANOV_K3 = 0.63576, 1.87320, 1.48695

APPROXIMATIONS = ("kingma", "molchanov")
# Where each approximation holds: Kingma's polynomial was fitted for alpha <= 1; Molchanov's is used on a clamped range
# so that exp(log_alpha) stays finite and the noise does not swamp the signal numerically.
LOG_ALPHA_RANGE = {"kingma": (-8.0, 0.0), "molchanov": (-8.0, 8.0)}


def kl_kingma(log_alpha: Tensor) -> Tensor:
    """Elementwise KL approximation of Kingma et al. (2015), without its additive constant; valid for alpha <= 1.

    Example:
        >>> round(kl_kingma(torch.tensor(0.0)).item(), 6)  # alpha = 1
        -0.245709
    """
    alpha = log_alpha.exp()
    return -(0.5 * log_alpha + KINGMA_C1 * alpha + KINGMA_C2 * alpha**2 + KINGMA_C3 * alpha**3)


def kl_molchanov(log_alpha: Tensor) -> Tensor:
    """Elementwise KL approximation of Molchanov et al. (2017); tends to 0 as alpha grows (the weight is dropped).

    Example:
        >>> round(kl_molchanov(torch.tensor(8.0)).item(), 4)
        0.0002
    """
    neg_kl = MOLCHANOV_K1 * torch.sigmoid(MOLCHANOV_K2 + MOLCHANOV_K3 * log_alpha) - 0.5 * F.softplus(-log_alpha)
    return MOLCHANOV_K1 - neg_kl


def _check_approximation(approximation: str) -> None:
    if approximation not in APPROXIMATIONS:
        raise ValueError(f"kl_approximation={approximation!r}; expected one of {', '.join(APPROXIMATIONS)}")


def _kl(log_alpha: Tensor, approximation: str) -> Tensor:
    return (kl_kingma if approximation == "kingma" else kl_molchanov)(log_alpha).sum()


class VariationalGaussianDropout(nn.Module):
    """Gaussian dropout whose rate is learned per unit: ``x * N(1, alpha)``, ``alpha = exp(log_alpha)`` per feature.

    Kingma et al.'s variational dropout on activations: the noise variance ``alpha`` (``p / (1 - p)`` in dropout
    terms) of each unit is a parameter, trained by the data loss plus the KL term :meth:`kl`, which pushes alphas up
    (more noise) where the data allows. Add the KL with :class:`~ml_optim_plugins.VariationalKL` (or
    ``loss + weight * variational_kl(model)`` yourself). Identity in eval.

    Args:
        num_features: number of units along ``dim``.
        dim: the feature dimension of the input (default last).
        p_init: initial dropout rate, in (0, 1); ``alpha = p / (1 - p)``.
        kl_approximation: ``"kingma"`` (the paper's polynomial; alpha clipped to <= 1, i.e. p <= 0.5, where it was
            fitted) or ``"molchanov"`` (valid for any alpha; log alpha clipped to [-8, 8]).

    Example:
        >>> layer = VariationalGaussianDropout(16, p_init=0.2)
        >>> round(layer.p.mean().item(), 3)
        0.2
        >>> layer(torch.randn(4, 16)).shape, layer.kl().shape
        (torch.Size([4, 16]), torch.Size([]))
    """

    def __init__(
        self, num_features: int, dim: int = -1, p_init: float = 0.1, kl_approximation: str = "kingma"
    ) -> None:
        super().__init__()
        check_number("p_init", p_init, above=0, below=1)
        _check_approximation(kl_approximation)
        if kl_approximation == "kingma" and p_init > 0.5:
            raise ValueError(
                f"p_init={p_init} is above 0.5, where kl_approximation='kingma' clips alpha (its polynomial holds for "
                "alpha <= 1, i.e. p <= 0.5) and the rate could not learn; use p_init <= 0.5 or 'molchanov'"
            )
        self.dim, self.kl_approximation = dim, kl_approximation
        self.log_alpha = nn.Parameter(torch.full((num_features,), math.log(p_init / (1.0 - p_init))))

    def clipped_log_alpha(self) -> Tensor:
        """``log_alpha`` clamped to the range where the KL approximation holds."""
        low, high = LOG_ALPHA_RANGE[self.kl_approximation]
        return self.log_alpha.clamp(low, high)

    @property
    def p(self) -> Tensor:
        """The equivalent dropout rate of each unit, ``alpha / (1 + alpha)``."""
        return torch.sigmoid(self.clipped_log_alpha()).detach()

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        shape = [1] * x.dim()
        shape[self.dim] = -1
        std = (0.5 * self.clipped_log_alpha()).exp().view(shape)
        return x * (1.0 + std * torch.randn_like(x))

    def kl(self) -> Tensor:
        """The summed KL term of this layer's units (up to an additive constant for ``"kingma"``)."""
        return _kl(self.clipped_log_alpha(), self.kl_approximation)

    def extra_repr(self) -> str:
        return f"num_features={self.log_alpha.numel()}, dim={self.dim}, kl_approximation={self.kl_approximation!r}"


class VariationalLinear(nn.Module):
    """A linear layer with Gaussian dropout per weight (sparse variational dropout, Molchanov et al. 2017).

    Each weight ``w`` has its own noise variance ``alpha * w**2``; training uses the local reparameterisation trick
    (sample the pre-activations, whose mean is ``x @ W.T + b`` and variance ``x**2 @ sigma2.T``, instead of the
    weights: cheaper and lower variance). The KL (:meth:`kl`) drives ``alpha`` of useless weights to infinity; in eval
    weights with ``log_alpha > threshold`` are dropped (set to 0), so the layer becomes sparse. :meth:`sparsity` reports
    the fraction dropped.

    Args:
        in_features: input size.
        out_features: output size.
        bias: learn an additive bias.
        threshold: ``log_alpha`` above which a weight is pruned in eval (3, i.e. dropout rate > 0.95, in the paper).
        kl_approximation: ``"molchanov"`` (default, any alpha) or ``"kingma"`` (alpha clipped to <= 1: no sparsity).

    Example:
        >>> layer = VariationalLinear(8, 4)
        >>> layer(torch.randn(2, 8)).shape, layer.sparsity() < 0.1  # only weights already near 0 start pruned
        (torch.Size([2, 4]), True)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        threshold: float = 3.0,
        kl_approximation: str = "molchanov",
    ) -> None:
        super().__init__()
        _check_approximation(kl_approximation)
        self.threshold, self.kl_approximation = check_number("threshold", threshold), kl_approximation
        reference = nn.Linear(in_features, out_features, bias=bias)  # the usual initialisation
        self.weight = nn.Parameter(reference.weight.detach().clone())
        self.bias = nn.Parameter(reference.bias.detach().clone()) if bias else None
        self.log_sigma2 = nn.Parameter(torch.full((out_features, in_features), -10.0))

    def log_alpha(self) -> Tensor:
        """Per-weight ``log(sigma2 / w**2)``, clamped to the approximation's range."""
        low, high = LOG_ALPHA_RANGE[self.kl_approximation]
        return (self.log_sigma2 - torch.log(self.weight**2 + 1e-8)).clamp(low, high)

    def mask(self) -> Tensor:
        """1 for the weights kept in eval, 0 for the pruned ones."""
        return (self.log_alpha() <= self.threshold).to(self.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return F.linear(x, self.weight * self.mask(), self.bias)
        mean = F.linear(x, self.weight, self.bias)
        sigma2 = (self.log_alpha() + torch.log(self.weight**2 + 1e-8)).exp()
        var = F.linear(x * x, sigma2)
        return mean + (var + 1e-8).sqrt() * torch.randn_like(mean)

    def kl(self) -> Tensor:
        """The summed KL term of this layer's weights."""
        return _kl(self.log_alpha(), self.kl_approximation)

    def sparsity(self) -> float:
        """Fraction of weights pruned in eval (``log_alpha > threshold``)."""
        return 1.0 - self.mask().mean().item()

    def extra_repr(self) -> str:
        out_features, in_features = self.weight.shape
        return f"in_features={in_features}, out_features={out_features}, bias={self.bias is not None}, " \
               f"threshold={self.threshold}"


def variational_modules(module: nn.Module) -> dict[str, nn.Module]:
    """``{name: submodule}`` of every submodule of ``module`` that has a KL term (a ``kl()`` method)."""
    return {name: m for name, m in module.named_modules() if callable(getattr(m, "kl", None))}


def variational_kl(module: nn.Module) -> Tensor:
    """Sum of the KL terms of every variational layer in ``module`` (0 if it has none).

    Add ``weight * variational_kl(model)`` to the loss yourself, with ``weight`` 1 / (number of training samples) for
    the variational objective per sample, or let :class:`~ml_optim_plugins.VariationalKL` do it.

    Example:
        >>> model = torch.nn.Sequential(VariationalLinear(4, 4), VariationalGaussianDropout(4))
        >>> variational_kl(model).requires_grad
        True
    """
    terms = [m.kl() for m in variational_modules(module).values()]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()
