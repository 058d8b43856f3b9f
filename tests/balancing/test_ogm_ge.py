"""OGM-GE functional core against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from ml_optim_plugins.functional import modulate_gradient, ogm_ge_coefficients, true_class_scores


def test_scores_are_summed_true_class_probabilities():
    logits = {"a": torch.tensor([[2.0, 0.0], [0.0, 1.0]]), "b": torch.zeros(2, 2)}
    scores = true_class_scores(logits, torch.tensor([0, 0]))
    p = math.exp(2) / (math.exp(2) + 1)
    assert scores["a"].item() == pytest.approx(p + 1 / (1 + math.e)) and scores["b"].item() == pytest.approx(1.0)


@pytest.mark.parametrize(
    "scores, alpha, smooth, expected",
    [
        ({"a": 30.0, "b": 10.0}, 0.1, False, {"a": 1 - math.tanh(0.3), "b": 1.0}),
        ({"a": 30.0, "b": 10.0}, 0.1, True, {"a": 1 - math.tanh(0.2), "b": 1.0}),
        ({"a": 10.0, "b": 10.0}, 0.5, False, {"a": 1.0, "b": 1.0}),
        ({"a": 10.5, "b": 10.0}, 0.5, False, {"a": 1 - math.tanh(0.525), "b": 1.0}),  # the reference's jump at rho=1
        ({"a": 10.5, "b": 10.0}, 0.5, True, {"a": 1 - math.tanh(0.025), "b": 1.0}),
        ({"a": 8.0, "b": 2.0, "c": 4.0}, 0.2, False, {"a": 1 - math.tanh(0.8), "b": 1.0, "c": 1 - math.tanh(0.4)}),
        ({"a": 0.0, "b": 3.0}, 0.5, False, {"a": 1.0, "b": 1.0}),
    ],
)
def test_coefficients_match_equation_10(scores, alpha, smooth, expected):
    assert ogm_ge_coefficients(scores, alpha, smooth) == pytest.approx(expected)


def test_negative_alpha_is_rejected():
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        ogm_ge_coefficients({"a": 1.0, "b": 2.0}, -0.1)


def test_modulation_without_noise_is_a_scaling_and_with_noise_uses_the_unmodulated_std():
    g = torch.randn(200, 300) * 3
    assert torch.equal(modulate_gradient(g, 1.0, noise=False), g)
    assert torch.allclose(modulate_gradient(g, 0.25, noise=False), g * 0.25)
    noisy = modulate_gradient(g, 0.25, noise=True, generator=torch.Generator().manual_seed(0))
    assert (noisy - 0.25 * g).std().item() == pytest.approx(g.std().item(), rel=0.02)
    again = modulate_gradient(g, 0.25, noise=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noisy, again)  # same seed, same noise: what keeps DDP ranks identical
