"""OGM-GE: on-the-fly gradient modulation with generalisation enhancement (Peng et al., CVPR 2022), functional core."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from ml_optim_plugins.hyperparameters import check_number


def true_class_scores(modality_logits: Mapping[str, Tensor], targets: Tensor) -> dict[str, Tensor]:
    """Each modality's score on a batch: the sum over the samples of its softmax probability of the true class.

    Sums, not means, so that the scores of micro-batches and DDP ranks add up to the global batch's.

    Args:
        modality_logits: ``{modality: logits}``, each batch x classes.
        targets: the class index of each sample.

    Returns:
        ``{modality: score}``, detached 0-d float tensors.

    Example:
        >>> logits = {"image": torch.zeros(2, 3), "text": torch.tensor([[5.0, 0, 0], [0, 5.0, 0]])}
        >>> {k: round(v.item(), 3) for k, v in true_class_scores(logits, torch.tensor([0, 1])).items()}
        {'image': 0.667, 'text': 1.973}
    """
    rows = torch.arange(targets.shape[0], device=targets.device)
    return {name: logits.detach().float().softmax(-1)[rows, targets].sum() for name, logits in modality_logits.items()}


def ogm_ge_coefficients(scores: Mapping[str, float], alpha: float, smooth: bool = False) -> dict[str, float]:
    """OGM's gradient coefficient of each modality, from the modalities' scores (eq. 10 of Peng et al., N modalities).

    With ``rho_u = s_u / min_v s_v``, ``k_u = 1 - tanh(alpha * rho_u)`` when ``rho_u > 1``, else 1 (the paper's form,
    which jumps to ``1 - tanh(alpha)`` as soon as a modality is ahead); ``smooth=True`` gives
    ``1 - tanh(alpha * (rho_u - 1))``, continuous at ``rho = 1``. The weakest modality keeps 1, and every modality does
    when the weakest score is not positive.

    Args:
        scores: ``{modality: score}`` (see :func:`true_class_scores`).
        alpha: modulation strength, ``>= 0`` (tuned per dataset: sweep it).
        smooth: the continuous form.

    Returns:
        ``{modality: k}``, each in ``(0, 1]``.

    Raises:
        ValueError: ``alpha`` negative or not finite.

    Example:
        >>> {k: round(v, 4) for k, v in ogm_ge_coefficients({"image": 10.0, "text": 20.0}, alpha=0.5).items()}
        {'image': 1.0, 'text': 0.2384}
        >>> {k: round(v, 4) for k, v in ogm_ge_coefficients({"image": 10.0, "text": 20.0}, 0.5, smooth=True).items()}
        {'image': 1.0, 'text': 0.5379}
    """
    check_number("alpha", alpha, at_least=0)
    values = {name: float(score) for name, score in scores.items()}
    weakest = min(values.values())
    if weakest <= 0:
        return dict.fromkeys(values, 1.0)  # no signal yet (or an empty batch): leave gradients alone
    coefficients = {}
    for name, score in values.items():
        ratio = score / weakest
        if smooth:
            coefficients[name] = 1.0 - math.tanh(alpha * max(ratio - 1.0, 0.0))
        else:
            coefficients[name] = 1.0 - math.tanh(alpha * ratio) if ratio > 1.0 else 1.0
    return coefficients


def modulate_gradient(grad: Tensor, coefficient: float, noise: bool, generator: torch.Generator | None = None) -> Tensor:
    """The modulated gradient ``k * g``, plus, if ``noise``, Gaussian noise with the std of the unmodulated ``g``.

    Args:
        grad: the gradient ``g``.
        coefficient: ``k``.
        noise: whether to add the noise (OGM-GE's generalisation enhancement).
        generator: the noise's generator (its device is used); seed it identically on every DDP rank for identical
            noise. ``None``: torch's default generator.

    Returns:
        A new tensor shaped like ``grad``.

    Example:
        >>> g = torch.ones(3, 3)
        >>> modulate_gradient(g, 0.5, noise=False)[0, 0].item()
        0.5
    """
    return modulate_with_noise(grad, coefficient, noise, generator)[0]


def modulate_with_noise(
    grad: Tensor, coefficient: float, noise: bool, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor | None]:
    """:func:`modulate_gradient` that also returns the noise it added (``None`` without noise), for statistics."""
    modulated = grad * coefficient
    if not noise:
        return modulated, None
    # The std stays a device tensor: no host synchronisation per modulated tensor.
    std = grad.float().std() + 1e-8 if grad.numel() > 1 else torch.tensor(1e-8, device=grad.device)
    device = generator.device if generator is not None else grad.device
    sample = torch.randn(grad.shape, generator=generator, dtype=torch.float32, device=device).to(grad.device)
    sample = sample.mul_(std).to(grad.dtype)
    return modulated.add_(sample), sample
