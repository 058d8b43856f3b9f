"""MMPareto (Wei & Hu, ICML 2024): combine each encoder's multimodal and unimodal gradients without conflict."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def mmpareto_weights_from_dots(mm_mm: float, uni_uni: float, mm_uni: float) -> tuple[float, float, float]:
    """MMPareto's weights of one encoder's multimodal and unimodal gradients, from their inner products.

    When ``g_mm`` and ``g_u`` agree (cosine > 0), both get 1/2; when they conflict, the weights of the minimum-norm
    point of their convex hull, ``k_mm = (g_u.g_u - g_mm.g_u) / |g_mm - g_u|^2``, ``k_u = 1 - k_mm``, a direction that
    increases neither loss; when one of them is (nearly) zero, ``(0.999, 0.001)`` or ``(0.001, 0.999)``.

    Args:
        mm_mm: ``g_mm . g_mm``.
        uni_uni: ``g_u . g_u``.
        mm_uni: ``g_mm . g_u``.

    Returns:
        ``(k_multimodal, k_unimodal, cosine)``.

    Example:
        >>> mmpareto_weights_from_dots(1.0, 2.0, -1.0)  # g_mm = (1, 0), g_u = (-1, 1)
        (0.6, 0.4, -0.7071067811865475)
    """
    norm = math.sqrt(mm_mm * uni_uni)
    cosine = mm_uni / norm if norm > 0 else 0.0
    if cosine > 0:
        return 0.5, 0.5, cosine
    # The reference solver's edge cases: when one gradient is (nearly) zero, keep a sliver of it rather than zeroing
    # the combination, which the norm rescaling then brings back to the plain gradient's size.
    if mm_uni >= mm_mm:
        return 0.999, 0.001, cosine
    if mm_uni >= uni_uni:
        return 0.001, 0.999, cosine
    k_mm = (uni_uni - mm_uni) / (mm_mm + uni_uni - 2.0 * mm_uni)
    return k_mm, 1.0 - k_mm, cosine


def mmpareto_weights(g_mm: Tensor, g_u: Tensor) -> tuple[float, float, float]:
    """:func:`mmpareto_weights_from_dots` of two gradients.

    Args:
        g_mm: the multimodal gradient, any shape (flattened): e.g. all of one encoder's parameters concatenated, as
            MMPareto decides once per encoder.
        g_u: the unimodal gradient, as many elements.

    Returns:
        ``(k_multimodal, k_unimodal, cosine)``.

    Example:
        >>> mmpareto_weights(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]))[:2]
        (0.5, 0.5)
    """
    a, b = g_mm.detach().double().reshape(-1), g_u.detach().double().reshape(-1)
    return mmpareto_weights_from_dots(float(a @ a), float(b @ b), float(a @ b))


def mmpareto_combine(
    total: Tensor, g_mm: Tensor, g_u: Tensor, k_mm: float, k_u: float, gamma: float = 1.5
) -> Tensor:
    """MMPareto's new gradient of one parameter tensor: ``2 (k_mm g_mm + k_u g_u)``, scaled up to the norm of the plain
    gradient ``total`` if it is smaller (never down), times ``gamma``. On the device, without a host sync.

    Args:
        total: the plain gradient (``g_mm + g_u``).
        g_mm: its multimodal part.
        g_u: its unimodal part.
        k_mm: the multimodal weight (see :func:`mmpareto_weights`).
        k_u: the unimodal weight.
        gamma: the final scale.

    Returns:
        A new tensor shaped like ``total``.

    Example:
        >>> a, b = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
        >>> mmpareto_combine(a + b, a, b, 0.6, 0.4, gamma=1.0)  # (0.4, 0.8) has norm 0.894 < |a + b| = 1
        tensor([0.4472, 0.8944])
    """
    new = (2.0 * k_mm) * g_mm + (2.0 * k_u) * g_u
    new_norm = new.float().norm()
    ratio = total.float().norm() / torch.where(new_norm > 0, new_norm, torch.ones_like(new_norm))
    scale = torch.where(new_norm > 0, ratio.clamp(min=1.0), torch.ones_like(ratio))
    return new * (scale * gamma).to(new.dtype)
