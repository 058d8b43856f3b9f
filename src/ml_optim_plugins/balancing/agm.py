"""AGM: adaptive gradient modulation (Li, Li, Hu, Lei, Li, Zhou, ICCV 2023), functional core."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ml_optim_plugins.hyperparameters import check_number

LOG_FLOOR = 1e-8  # the reference clamps the true-class probability here before taking the log


def mono_modal_losses(modality_logits: Mapping[str, Tensor], targets: Tensor) -> dict[str, Tensor]:
    """Each modality's cross-entropy on the batch, summed over the samples: ``sum -log max(p_u(y), 1e-8)``.

    Sums, so that micro-batches and DDP ranks add up; divided by the sample count, they are AGM's mean scores.

    Args:
        modality_logits: ``{modality: logits}``, each batch x classes.
        targets: the class index of each sample.

    Returns:
        ``{modality: summed loss}``, detached 0-d float tensors.

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

    ``N / (N - 1) * (m - s_u)`` is the mean of ``s_v - s_u`` over the other modalities ``v``, so a modality with a
    lower loss than the others has ``r_u > 1``.

    Args:
        losses: ``{modality: mean loss}``, at least two.

    Returns:
        ``{modality: ratio}``.

    Raises:
        ValueError: fewer than two losses.

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
    """AGM's coefficient of each modality, from its mean loss on the step and the running mean of its loss.

    ``k_u = exp(alpha * min(t_u - r_u, max_gap))``, with ``r_u`` the :func:`agm_ratios` of the step's losses and
    ``t_u`` those of the running means: a modality further ahead of the others than usual is slowed (``k < 1``), one
    behind is sped up (``k > 1``). ``clamp`` then bounds ``k`` itself.

    Args:
        scores: ``{modality: mean loss on the step}`` (see :func:`mono_modal_losses`).
        running: ``{modality: running mean of its loss}`` (see :func:`update_running`), for every modality of
            ``scores``.
        alpha: modulation strength, ``>= 0``.
        clamp: ``(low, high)`` bounds of ``k``; ``None``: unbounded.
        max_gap: the cap on ``t_u - r_u`` (from above only); ``None``: no cap.

    Returns:
        ``{modality: k}``.

    Raises:
        ValueError: ``alpha`` negative or not finite; fewer than two modalities.

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
    """The running means after one more step: the cumulative mean over ``count`` steps (this one included).

    Args:
        running: ``{modality: mean over the previous count - 1 steps}`` (empty at the first step).
        scores: ``{modality: this step's value}``.
        count: the number of steps, this one included.

    Returns:
        ``{modality: mean over count steps}``.

    Example:
        >>> update_running({"a": 1.0}, {"a": 4.0}, count=3)
        {'a': 2.0}
    """
    return {name: running.get(name, 0.0) * (count - 1) / count + scores[name] / count for name in scores}
