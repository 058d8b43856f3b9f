"""ModalityBalancer in a real Trainer: the step it applies, accumulation, window, neutrality, errors."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from ml_optim_plugins import (
    ConcatFusion, ModalityBalancer, MultimodalClassifier,
)
from ml_optim_plugins.diagnostics import MetricHistory
from ml_optim_plugins.functional import ogm_ge_coefficients, true_class_scores
from tests.balancing.tiny import imbalanced_samples, loader, tiny_classifier


def fit(make_diag_trainer, callbacks, steps=1, accumulate=1, batch_size=16):
    model = tiny_classifier()
    trainer = make_diag_trainer(max_steps=steps, accumulate_grad_batches=accumulate, callbacks=callbacks,
                                num_sanity_val_steps=0)
    trainer.fit(model, train_dataloaders=loader(batch_size))
    return model


def first_batch(size=16):
    samples = imbalanced_samples()[:size]
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def test_one_step_scales_the_dominant_encoder_by_its_coefficient(make_diag_trainer):
    balancer = ModalityBalancer("ogm", alpha=0.5)
    trained = fit(make_diag_trainer, [balancer])
    reference = tiny_classifier()
    batch = first_batch()
    loss = reference.training_step(batch, 0)
    scores = true_class_scores(reference.modality_logits, batch["label"])
    expected = ogm_ge_coefficients({k: v.item() for k, v in scores.items()}, 0.5)
    assert expected["a"] < 1 and expected["b"] == 1.0  # "a" dominates
    assert {m: balancer.last[m]["coefficient"] for m in "ab"} == pytest.approx(expected)
    grads = torch.autograd.grad(loss, [reference.encoders["a"].weight, reference.encoders["a"].bias])
    # "weights" only: the encoder's weight is scaled, its bias is not
    assert torch.allclose(trained.encoders["a"].weight, reference.encoders["a"].weight - 0.5 * expected["a"] * grads[0], atol=1e-6)
    assert torch.allclose(trained.encoders["a"].bias, reference.encoders["a"].bias - 0.5 * grads[1], atol=1e-6)
    stats = balancer.last["a"]
    assert stats["grad_norm_after"] == pytest.approx(expected["a"] * stats["grad_norm_before"], rel=1e-5)
    assert stats["noise_norm"] == 0.0


def test_coefficient_one_without_noise_changes_nothing(make_diag_trainer):
    plain = fit(make_diag_trainer, [], steps=3)
    neutral = fit(make_diag_trainer, [ModalityBalancer("ogm", alpha=0.0)], steps=3)
    for a, b in zip(plain.parameters(), neutral.parameters()):
        assert torch.equal(a, b)


def test_enhancement_adds_noise_with_the_gradient_std(make_diag_trainer):
    balancer = ModalityBalancer("ogm_ge", alpha=0.5, parameters="all")
    fit(make_diag_trainer, [balancer])
    assert balancer.last["a"]["noise_norm"] > 0 and balancer.last["b"]["noise_norm"] > 0


def test_scores_are_summed_over_accumulated_micro_batches(make_diag_trainer):
    balancer = ModalityBalancer("ogm", alpha=0.5)
    fit(make_diag_trainer, [balancer], steps=1, accumulate=2, batch_size=8)
    reference = tiny_classifier()
    batch = first_batch(16)
    reference.training_step(batch, 0)
    scores = true_class_scores(reference.modality_logits, batch["label"])
    assert balancer.last["a"]["score"] == pytest.approx(scores["a"].item(), rel=1e-5)
    assert balancer.last["b"]["score"] == pytest.approx(scores["b"].item(), rel=1e-5)


def test_outside_the_window_nothing_is_modulated(make_diag_trainer):
    plain = fit(make_diag_trainer, [], steps=2)
    late = fit(make_diag_trainer, [ModalityBalancer("ogm_ge", alpha=0.9, window=(5, 10), window_unit="step")], steps=2)
    for a, b in zip(plain.parameters(), late.parameters()):
        assert torch.equal(a, b)


def test_module_without_the_contract_fails_before_training(make_diag_trainer):
    trainer = make_diag_trainer(max_steps=1, callbacks=[ModalityBalancer()])
    with pytest.raises(TypeError, match="ModalityBalancer"):
        trainer.fit(BoringModel())
    assert trainer.global_step == 0


class ForgetsToRecord(MultimodalClassifier):
    """A mixin module whose training step never calls record_modality_outputs."""

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self(batch), batch[self.label_key])


def test_a_step_that_records_no_modality_outputs_fails_at_the_first_step(make_diag_trainer):
    model = ForgetsToRecord(tiny_classifier().encoders, num_classes=3, feature_dims={"a": 8, "b": 8})
    trainer = make_diag_trainer(max_steps=3, callbacks=[ModalityBalancer("ogm_ge")], num_sanity_val_steps=0)
    with pytest.raises(RuntimeError, match=r"training step 0 of ForgetsToRecord .*record_modality_outputs"):
        trainer.fit(model, train_dataloaders=loader())
    assert trainer.global_step == 0  # issue 17: no silent run without balancing


@pytest.mark.parametrize(
    "kwargs, message",
    [({"method": "agm2"}, "method='agm2'"), ({"alpha": -1}, "alpha must be a finite number >= 0"),
     ({"window": (5, 2)}, "first <= last"), ({"parameters": "bias"}, "parameters='bias'")],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModalityBalancer(**kwargs)


def test_conv_only_selection_on_linear_encoders_is_an_error(make_diag_trainer):
    trainer = make_diag_trainer(max_steps=1, callbacks=[ModalityBalancer(parameters="conv")], num_sanity_val_steps=0)
    with pytest.raises(ValueError, match=r"selects no parameter of the encoders \['a', 'b'\]"):
        trainer.fit(tiny_classifier(), train_dataloaders=loader())


class TwoOptimizers(MultimodalClassifier):
    """Manual optimization with one optimizer per encoder (the head goes with "a"): two steps per batch."""

    def __init__(self, aux_loss_weight: float = 0.0):
        torch.manual_seed(0)
        super().__init__({"a": torch.nn.Linear(4, 8), "b": torch.nn.Linear(6, 8)}, fusion=ConcatFusion(),
                         num_classes=3, feature_dims={"a": 8, "b": 8}, aux_loss_weight=aux_loss_weight)
        self.automatic_optimization = False

    def configure_optimizers(self):
        rest = [p for n, p in self.named_parameters() if not n.startswith("encoders.b.")]
        return (torch.optim.SGD(rest, lr=0.5), torch.optim.SGD(self.encoders["b"].parameters(), lr=0.5))

    def training_step(self, batch, batch_idx):
        first, second = self.optimizers()
        loss = self.step(batch, "train")
        first.zero_grad()
        second.zero_grad()
        self.manual_backward(loss)
        first.step()
        second.step()


class GradientTaps(pl.Callback):
    """Each optimizer step's gradients of both encoders' weights, as they reach this callback, and the balancer's log."""

    def __init__(self, balancer=None):
        self.rows, self.balancer = [], balancer

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        row = {m: pl_module.encoders[m].weight.grad.clone() for m in "ab"}
        if self.balancer is not None:
            row["logged"] = dict(self.balancer.last)
        self.rows.append(row)


@pytest.mark.parametrize("method", ["ogm_ge", "ogm", "agm"])
def test_logged_norms_keep_the_modulation_and_the_noise_apart(make_diag_trainer, method):
    balancer, history = ModalityBalancer(method, alpha=0.5), MetricHistory()
    before, after = GradientTaps(), GradientTaps()
    trainer = make_diag_trainer(max_steps=1, callbacks=[before, balancer, after], logger=history,
                                num_sanity_val_steps=0)
    trainer.fit(tiny_classifier(), train_dataloaders=loader(16))
    for m in "ab":  # parameters="weights": each encoder's weight is its only modulated tensor
        g, stepped = before.rows[0][m], after.rows[0][m]
        k = history.series(f"balance/{m}/coefficient")[0][1]
        by_hand = {"grad_norm_before": g.norm().item(), "grad_norm_modulated": k * g.norm().item(),
                   "noise_norm": (stepped - k * g).norm().item(), "grad_norm_after": stepped.norm().item()}
        logged = {name: history.series(f"balance/{m}/{name}")[0][1] for name in by_hand}
        assert logged == pytest.approx(by_hand, rel=1e-4, abs=1e-7)
        assert (logged["noise_norm"] > 0) == (method == "ogm_ge")
    assert history.series("balance/a/grad_norm_modulated")[0][1] < history.series("balance/a/grad_norm_before")[0][1]


@pytest.mark.parametrize("method", ["ogm_ge", "agm"])
def test_each_of_several_optimizers_modulates_its_own_parameters_once(make_diag_trainer, method):
    balancer = ModalityBalancer(method, alpha=0.5)
    before, after = GradientTaps(), GradientTaps(balancer)
    trainer = make_diag_trainer(max_steps=4, callbacks=[before, balancer, after], num_sanity_val_steps=0)
    trainer.fit(TwoOptimizers(), train_dataloaders=loader(16))
    assert len(before.rows) == 4  # two batches, two optimizer steps each
    for step in range(4):
        stepped, other = ("a", "b") if step % 2 == 0 else ("b", "a")
        raw, seen, logged = before.rows[step], after.rows[step], after.rows[step]["logged"]
        assert set(logged) == {stepped}  # logs what this optimizer's step modulated
        assert torch.equal(seen[other], raw[other])  # the other optimizer's encoder is left for its own step
        k, noise = logged[stepped]["coefficient"], logged[stepped]["noise_norm"]
        # one modulation: k * g + (for OGM-GE) one draw of noise
        assert (seen[stepped] - k * raw[stepped]).norm().item() == pytest.approx(noise, rel=1e-4, abs=1e-7)
    if method == "agm":
        assert balancer.state_dict()["agm_steps"] == 2  # the running means advance once per batch


def test_mmpareto_combines_each_optimizers_encoders_at_its_step(make_diag_trainer):
    balancer = ModalityBalancer("mmpareto")
    before, after = GradientTaps(), GradientTaps(balancer)
    trainer = make_diag_trainer(max_steps=4, callbacks=[before, balancer, after], num_sanity_val_steps=0)
    trainer.fit(TwoOptimizers(aux_loss_weight=1.0), train_dataloaders=loader(16))
    for step in range(4):
        stepped, other = ("a", "b") if step % 2 == 0 else ("b", "a")
        logged = after.rows[step]["logged"]
        assert set(logged) == {stepped}
        assert logged[stepped]["grad_norm_after"] >= logged[stepped]["grad_norm_before"] > 0  # rescaled, x gamma
        assert not torch.equal(after.rows[step][stepped], before.rows[step][stepped])
        assert torch.equal(after.rows[step][other], before.rows[step][other])
    assert balancer._unimodal == {}  # nothing left over after the batches
