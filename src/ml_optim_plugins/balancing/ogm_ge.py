"""OGM-GE: on-the-fly gradient modulation with generalisation enhancement (Peng et al., CVPR 2022), functional core."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from ml_optim_plugins.hyperparameters import check_number


def true_class_scores(modality_logits: Mapping[str, Tensor], targets: Tensor) -> dict[str, Tensor]:
    """Each modality's score on a batch: the sum over samples of its softmax probability of the true class.

    This is the reference code's ``score_u = sum_i softmax(out_u)[i][y_i]``: a sum, not a mean, so scores of several
    DDP ranks add up to the score of the global batch.

    Example:
        >>> logits = {"image": torch.zeros(2, 3), "text": torch.tensor([[5.0, 0, 0], [0, 5.0, 0]])}
        >>> {k: round(v.item(), 3) for k, v in true_class_scores(logits, torch.tensor([0, 1])).items()}
        {'image': 0.667, 'text': 1.973}
    """
    rows = torch.arange(targets.shape[0], device=targets.device)
    return {name: logits.detach().float().softmax(-1)[rows, targets].sum() for name, logits in modality_logits.items()}


def ogm_ge_coefficients(scores: Mapping[str, float], alpha: float, smooth: bool = False) -> dict[str, float]:
    """Gradient coefficients per modality from their scores (OGM, Peng et al. 2022, eq. 10, for N modalities).

    Each modality's discrepancy ratio is its score over the weakest modality's score, ``rho_u = s_u / min_v s_v``
    (for two modalities: the reference code's ``score_v / score_a`` and its inverse). The reference form is
    ``k_u = 1 - tanh(alpha * rho_u)`` when ``rho_u > 1`` and 1 otherwise: discontinuous at ``rho = 1`` (a modality
    barely ahead is slowed by ``1 - tanh(alpha)`` at once). ``smooth=True`` uses ``1 - tanh(alpha * (rho_u - 1))``,
    which starts at 1 and decreases continuously. The weakest modality always keeps ``k = 1``.

    Args:
        scores: ``{modality: score}`` (see :func:`true_class_scores`), all > 0.
        alpha: strength of the modulation (the reference code requires it; the paper tunes it per dataset, e.g.
            0.1 to 0.8; sweep it).
        smooth: the continuous variant instead of the reference form.

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
    """``k * g``, plus Gaussian enhancement ``N(0, std(g)^2)`` with the std of the unmodulated gradient if ``noise``.

    The noise is drawn from ``generator`` (on its device; seed it identically on every rank to get identical noise).

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
