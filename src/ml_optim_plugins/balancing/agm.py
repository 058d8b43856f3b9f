"""AGM: adaptive gradient modulation (Li, Li, Hu, Lei, Li, Zhou, ICCV 2023), functional core."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ml_optim_plugins.hyperparameters import check_number

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


def agm_ratios(losses: Mapping[str, float]) -> dict[str, float]:
    """AGM's ratio of each modality: ``r_u = exp(N / (N - 1) * (m - s_u))``, ``m`` the mean of the ``N`` losses.

    ``N / (N - 1) * (m - s_u)`` is the mean of ``s_v - s_u`` over the other modalities ``v``, so a modality doing better
    than the others (a lower loss) has ``r_u > 1``. It is the reference code's scaling in each case it covers: ``2`` for
    two modalities (``exp(s_other - s_u)``), ``3/2`` for three (its UR-Funny script); more modalities follow the same
    mean gap.

    Example:
        >>> {k: round(v, 4) for k, v in agm_ratios({"a": 0.2, "b": 1.0}).items()}  # exp(+-0.8)
        {'a': 2.2255, 'b': 0.4493}
    """
    if len(losses) < 2:
        raise ValueError(f"AGM compares modalities: need at least two losses, got {sorted(losses)}")
    count = len(losses)
    mean = sum(losses.values()) / count
    return {name: math.exp(count / (count - 1) * (mean - loss)) for name, loss in losses.items()}


def agm_coefficients(
    scores: Mapping[str, float],
    running: Mapping[str, float],
    alpha: float,
    clamp: Sequence[float] | None = None,
    max_gap: float | None = None,
) -> dict[str, float]:
    """AGM coefficients from the step's mean mono-modal losses and their running means.

    With ``s_u`` the modality's mean cross-entropy on the step, the current ratio ``r_u`` is :func:`agm_ratios` of the
    step's losses (a modality doing better than the others has ``r_u > 1``); the target ratio ``t_u`` is the same over
    the running means of the losses; the coefficient is ``k_u = exp(alpha * min(t_u - r_u, max_gap))``: a modality
    currently ahead of its usual standing is slowed, one behind is sped up (``k > 1``). ``max_gap`` is the reference
    code's cap (10 in its CREMA-D script, 7 in its UR-Funny one; none in its AV-MNIST, AVE and CMU-MOSEI scripts);
    ``clamp=(low, high)`` then bounds ``k`` itself (the library's own guard: ``k`` grows exponentially).

    Example:
        >>> k = agm_coefficients({"a": 0.2, "b": 1.0}, {"a": 0.5, "b": 0.7}, alpha=1.0)
        >>> k["a"] < 1 < k["b"]
        True
    """
    check_number("alpha", alpha, at_least=0)
    ratios = agm_ratios(scores)
    targets = agm_ratios({name: running[name] for name in scores})
    coefficients = {}
    for name, ratio in ratios.items():
        gap = targets[name] - ratio
        if max_gap is not None:
            gap = min(gap, max_gap)
        k = math.exp(alpha * gap)
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
