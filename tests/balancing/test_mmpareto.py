"""MMPareto: the functional core against hand-computed values, the callback against a from-scratch computation on
the same batch, and clear errors. What MMPareto shares with the other methods
(accumulation, window, several optimizers, DDP, resume) is tested over all of them in test_balancer.py and
test_ddp.py."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from ml_optim_plugins import ModalityBalancer
from ml_optim_plugins.balancing import mmpareto_weights_from_dots
from ml_optim_plugins.functional import mmpareto_combine, mmpareto_weights
from tests.balancing.tiny import imbalanced_samples, loader, tiny_classifier


@pytest.mark.parametrize(
    ("g_mm", "g_u", "expected"),
    [
        ([1.0, 0.0], [1.0, 1.0], (0.5, 0.5)),  # agree: equal weights
        ([1.0, 0.0], [-1.0, 1.0], (0.6, 0.4)),  # conflict: min-norm point, (g_u.g_u - g_mm.g_u) / |g_mm - g_u|^2
        ([1.0, 0.0], [-3.0, 0.0], (0.75, 0.25)),  # opposite: the combination cancels exactly
        ([0.0, 0.0], [1.0, 0.0], (0.999, 0.001)),  # one side zero: the reference solver's edge cases
        ([1.0, 0.0], [0.0, 0.0], (0.001, 0.999)),
    ],
)
def test_weights_by_hand(g_mm, g_u, expected):
    k_mm, k_u, _ = mmpareto_weights(torch.tensor(g_mm), torch.tensor(g_u))
    assert (k_mm, k_u) == pytest.approx(expected)
    if expected[0] not in (0.5, 0.999, 0.001):  # the min-norm point is orthogonal to the segment between the two gradients
        point = k_mm * torch.tensor(g_mm) + k_u * torch.tensor(g_u)
        assert float(point @ (torch.tensor(g_mm) - torch.tensor(g_u))) == pytest.approx(0.0, abs=1e-6)


def test_weights_from_dots_give_the_cosine():
    assert mmpareto_weights_from_dots(4.0, 1.0, 2.0) == (0.5, 0.5, 1.0)


def test_combine_scales_up_to_the_plain_norm_never_down():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    up = mmpareto_combine(a + b, a, b, 0.6, 0.4, gamma=1.5)
    assert up.norm().item() == pytest.approx(1.5 * (a + b).norm().item())
    assert torch.allclose(up / up.norm(), torch.tensor([0.4, 0.8]) / torch.tensor([0.4, 0.8]).norm())
    big = mmpareto_combine(torch.tensor([0.1, 0.0]), a, a, 0.5, 0.5, gamma=1.0)
    assert torch.allclose(big, 2 * a)  # larger than the plain gradient: kept
    assert torch.equal(mmpareto_combine(a, torch.zeros(2), torch.zeros(2), 0.5, 0.5), torch.zeros(2))
    # One side zero: the combination is a sliver of the other, scaled back up to the plain gradient (times gamma).
    k_mm, k_u, _ = mmpareto_weights(torch.zeros(2), a)
    assert torch.allclose(mmpareto_combine(a, torch.zeros(2), a, k_mm, k_u, gamma=1.5), 1.5 * a)


class GradRecorder(pl.Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not hasattr(self, "grads"):
            self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}


def test_the_callback_matches_a_from_scratch_computation():
    model = tiny_classifier(aux_loss_weight=1.0)
    reference = copy.deepcopy(model)
    recorder = GradRecorder()
    pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[ModalityBalancer("mmpareto"), recorder]).fit(model, loader(16))
    samples = imbalanced_samples()[:16]
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    features = reference.compute_features(batch)
    fused = F.cross_entropy(reference.fusion(features), batch["label"])
    for name in ("a", "b"):
        params = list(reference.encoders[name].parameters())
        unimodal = F.cross_entropy(reference.aux_heads[name](features[name]), batch["label"])
        g_mm = torch.autograd.grad(fused, params, retain_graph=True)
        g_u = torch.autograd.grad(unimodal, params, retain_graph=True)
        k_mm, k_u, _ = mmpareto_weights(torch.cat([g.flatten() for g in g_mm]), torch.cat([g.flatten() for g in g_u]))
        for (pname, _), a, b in zip(reference.encoders[name].named_parameters(), g_mm, g_u):
            expected = mmpareto_combine(a + b, a, b, k_mm, k_u, gamma=1.5)
            assert torch.allclose(recorder.grads[f"encoders.{name}.{pname}"], expected, atol=1e-6), pname
    head = torch.autograd.grad(fused, [reference.fusion.head.weight], retain_graph=True)[0]
    assert torch.allclose(recorder.grads["fusion.head.weight"], head, atol=1e-6)  # heads keep their gradients


def test_mmpareto_needs_unimodal_losses():
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[ModalityBalancer("mmpareto")])
    with pytest.raises(ValueError, match=r"aux_loss_weight=1.0"):
        trainer.fit(tiny_classifier(), loader())


def test_frozen_or_unused_encoders_are_not_reported():
    model = tiny_classifier(aux_loss_weight=1.0)
    model.encoders["b"].requires_grad_(False)
    balancer = ModalityBalancer("mmpareto")
    pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[balancer]).fit(model, loader(16))
    assert set(balancer.last) == {"a"}
