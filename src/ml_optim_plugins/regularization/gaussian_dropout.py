"""Gaussian dropout: multiply by noise N(1, p / (1 - p)) instead of a Bernoulli mask (Srivastava et al. 2014, sec. 10)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ml_optim_plugins.hyperparameters import check_rate


def gaussian_dropout(
    x: Tensor,
    p: float,
    training: bool = True,
    shared_dims: Sequence[int] = (),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Multiply ``x`` by Gaussian noise of mean 1 and variance ``p / (1 - p)`` (identity when not training or p = 0).

    Bernoulli dropout with rate ``p`` and inverted scaling has exactly this mean and variance; the Gaussian version
    keeps every unit (no dead units in a step) and is smooth. Same mean and variance as Keras'
    ``GaussianDropout(rate=p)``.

    Args:
        x: input of any shape.
        p: dropout rate in [0, 1).
        training: apply noise only when True.
        shared_dims: dimensions along which one noise value is shared (broadcast), e.g. ``(2, 3)`` for one value per
            feature map of an ``(N, C, H, W)`` tensor, ``(-1,)`` for one value per token of ``(B, T, D)``.
        generator: optional random generator, for reproducible noise.

    Returns:
        ``x * noise``, differentiable in ``x`` (the gradient is multiplied by the same noise).

    Example:
        >>> x = torch.ones(10000)
        >>> y = gaussian_dropout(x, 0.2, generator=torch.Generator().manual_seed(0))
        >>> round(y.mean().item(), 1), round(y.var().item(), 2)
        (1.0, 0.25)
    """
    p = check_rate(p)
    if not training or p == 0.0:
        return x
    shape = list(x.shape)
    for dim in shared_dims:
        shape[dim] = 1
    noise = torch.empty(shape, dtype=x.dtype, device=x.device)
    noise.normal_(1.0, math.sqrt(p / (1.0 - p)), generator=generator)
    return x * noise


class GaussianDropout(nn.Module):
    """Gaussian (multiplicative) dropout: ``x * N(1, p / (1 - p))`` in training, identity in eval.

    A drop-in for ``nn.Dropout(p)``: same rate, same mean and variance of the multiplier, and a ``p`` attribute
    (code that reads ``dropout.p``, like timm's and transformers' fused attention, keeps working). See
    :func:`gaussian_dropout`.

    Args:
        p: dropout rate in [0, 1); 0 is the identity.
        shared_dims: dimensions along which the noise is shared (e.g. ``(2, 3)``: per feature map).
        mc: keep the noise at inference too, for Monte-Carlo dropout uncertainty estimates (average several
            stochastic forward passes in eval mode).

    Raises:
        ValueError: if ``p`` is outside [0, 1).

    Example:
        >>> layer = GaussianDropout(0.1)
        >>> x = torch.randn(4, 8)
        >>> torch.equal(layer.eval()(x), x)
        True
        >>> layer.train()(x).shape
        torch.Size([4, 8])
    """

    def __init__(self, p: float = 0.5, shared_dims: Sequence[int] = (), mc: bool = False) -> None:
        super().__init__()
        self.p = check_rate(p)
        self.shared_dims = tuple(int(d) for d in shared_dims)
        self.mc = mc

    def forward(self, x: Tensor) -> Tensor:
        return gaussian_dropout(x, self.p, self.training or self.mc, self.shared_dims)

    def extra_repr(self) -> str:
        extra = f"p={self.p}"
        if self.shared_dims:
            extra += f", shared_dims={self.shared_dims}"
        return extra + (", mc=True" if self.mc else "")
