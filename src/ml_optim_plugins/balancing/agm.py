"""AGM: adaptive gradient modulation (Li, Li, Hu, Lei, Li, Zhou, ICCV 2023), functional core."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

LOG_FLOOR = 1e-8  # the reference clamps the true-class probability here before taking the log


def mono_modal_losses(modality_logits: Mapping[str, Tensor], targets: Tensor) -> dict[str, Tensor]:
    """Each modality's summed cross-entropy on the batch, ``sum -log max(p_u(y), 1e-8)`` (divide by the sample count,
    after summing over DDP ranks, for AGM's mean score).

    Example:
        >>> out = mono_modal_losses({"a": torch.zeros(2, 2)}, torch.tensor([0, 1]))
        >>> round(out["a"].item(), 4)  # 2 * ln 2
        1.3863
    """
    rows = torch.arange(targets.shape[0], device=targets.device)
    return {
        name: -logits.detach().float().softmax(-1)[rows, targets].clamp_min(LOG_FLOOR).log().sum()
        for name, logits in modality_logits.items()
    }


def agm_coefficients(
    scores: Mapping[str, float],
    running: Mapping[str, float],
    alpha: float,
    clamp: Sequence[float] | None = None,
) -> dict[str, float]:
    """AGM coefficients from the step's mean mono-modal losses and their running means.

    With ``s_u`` the modality's mean cross-entropy on the step and ``m`` the mean over modalities, the current ratio is
    ``r_u = exp(2 (m - s_u))`` (a modality doing better than average has ``r_u > 1``); the target ratio ``t_u`` is the
    same expression over the running means of the losses; the coefficient is ``k_u = exp(alpha (t_u - r_u))``: a
    modality currently ahead of its usual standing is slowed, one behind is sped up (``k > 1``). For two modalities
    this is the reference code's ``exp((s_other - s_u))`` form. ``clamp=(low, high)`` bounds ``k`` (the reference does
    not; ``k`` grows exponentially).

    Example:
        >>> k = agm_coefficients({"a": 0.2, "b": 1.0}, {"a": 0.5, "b": 0.7}, alpha=1.0)
        >>> k["a"] < 1 < k["b"]
        True
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    names = list(scores)
    mean_now = sum(scores[n] for n in names) / len(names)
    mean_running = sum(running[n] for n in names) / len(names)
    coefficients = {}
    for name in names:
        ratio = math.exp(2.0 * (mean_now - scores[name]))
        target = math.exp(2.0 * (mean_running - running[name]))
        k = math.exp(alpha * (target - ratio))
        if clamp is not None:
            k = min(max(k, clamp[0]), clamp[1])
        coefficients[name] = k
    return coefficients


def update_running(running: Mapping[str, float], scores: Mapping[str, float], count: int) -> dict[str, float]:
    """Cumulative mean over ``count`` steps (``count`` includes this one), as the reference keeps it.

    Example:
        >>> update_running({"a": 1.0}, {"a": 4.0}, count=3)
        {'a': 2.0}
    """
    return {name: running.get(name, 0.0) * (count - 1) / count + scores[name] / count for name in scores}
