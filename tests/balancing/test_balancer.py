"""ModalityBalancer in a real Trainer: the step it applies, accumulation, window, neutrality, several optimizers,
resume, errors. Behaviour every method shares is tested once, parametrized over the methods."""

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


METHODS = ["ogm_ge", "ogm", "agm", "mmpareto"]


def aux_weight(method):
    """MMPareto needs unimodal losses (an auxiliary weight), the other methods none."""
    return 1.0 if method == "mmpareto" else 0.0


def fit(make_diag_trainer, callbacks, steps=1, accumulate=1, batch_size=16, aux_loss_weight=0.0):
    model = tiny_classifier(aux_loss_weight=aux_loss_weight)
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


@pytest.mark.parametrize("method", METHODS)
def test_outside_the_window_nothing_is_modulated(make_diag_trainer, method):
    plain = fit(make_diag_trainer, [], steps=2, aux_loss_weight=aux_weight(method))
    balancer = ModalityBalancer(method, alpha=0.9, window=(5, 10), window_unit="step")
    late = fit(make_diag_trainer, [balancer], steps=2, aux_loss_weight=aux_weight(method))
    for a, b in zip(plain.parameters(), late.parameters()):
        assert torch.equal(a, b)
    assert balancer.last == {}


@pytest.mark.parametrize("method", METHODS)
def test_gradient_accumulation_equals_one_large_batch(make_diag_trainer, method):
    whole = fit(make_diag_trainer, [ModalityBalancer(method)], steps=1, batch_size=16,
                aux_loss_weight=aux_weight(method))
    accumulated = fit(make_diag_trainer, [ModalityBalancer(method)], steps=1, accumulate=2, batch_size=8,
                      aux_loss_weight=aux_weight(method))
    for (name, a), b in zip(whole.named_parameters(), accumulated.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


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


@pytest.mark.parametrize(
    "method, kwargs, warned",
    [
        ("mmpareto", {"alpha": 0.9}, ["alpha=0.9 (used by ogm_ge, ogm, agm)"]),
        ("ogm_ge", {"gamma": 2.0, "clamp": None}, ["clamp=None (used by agm)", "gamma=2.0 (used by mmpareto)"]),
        ("agm", {"smooth": True, "seed": 3}, ["smooth=True (used by ogm_ge, ogm)", "seed=3 (used by ogm_ge)"]),
        ("ogm", {"seed": 3}, ["seed=3 (used by ogm_ge)"]),
    ],
)
def test_an_argument_the_method_does_not_use_is_warned_about(method, kwargs, warned):
    with pytest.warns(UserWarning, match=rf"ModalityBalancer\(method='{method}'\) ignores") as record:
        ModalityBalancer(method, **kwargs)
    (message,) = [str(w.message) for w in record if "ignores" in str(w.message)]
    assert all(part in message for part in warned), message
    assert message.count("(used by") == len(warned)


@pytest.mark.parametrize("method", METHODS)
def test_defaults_and_the_methods_own_arguments_are_not_warned_about(method, recwarn):
    own = {"ogm_ge": {"alpha": 0.2, "smooth": True, "seed": 4}, "ogm": {"alpha": 0.2, "smooth": True},
           "agm": {"alpha": 0.2, "clamp": [0.1, 10.0], "max_gap": 2.0}, "mmpareto": {"gamma": 1.1}}[method]
    ModalityBalancer(method, **own)
    ModalityBalancer(method, alpha=0.5, clamp=(0.1, 10.0), gamma=1.5, seed=0, smooth=False, max_gap=None)  # defaults
    assert not [w for w in recwarn if "ignores" in str(w.message)]


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
    """Each optimizer step's gradients of both encoders, as they reach this callback (each weight, and all of the
    encoder's parameters flattened), and the balancer's log."""

    def __init__(self, balancer=None):
        self.rows, self.balancer = [], balancer

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        row = {m: pl_module.encoders[m].weight.grad.clone() for m in "ab"}
        row["all"] = {m: torch.cat([p.grad.flatten() for p in pl_module.encoders[m].parameters()]) for m in "ab"}
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


@pytest.mark.parametrize("method", ["ogm_ge", "agm", "mmpareto"])
def test_each_of_several_optimizers_balances_its_own_parameters_once(make_diag_trainer, method):
    balancer = ModalityBalancer(method, alpha=0.5, parameters="all")
    before, after = GradientTaps(), GradientTaps(balancer)
    trainer = make_diag_trainer(max_steps=4, callbacks=[before, balancer, after], num_sanity_val_steps=0)
    trainer.fit(TwoOptimizers(aux_loss_weight=aux_weight(method)), train_dataloaders=loader(16))
    assert len(before.rows) == 4  # two batches, two optimizer steps each
    for step in range(4):
        stepped, other = ("a", "b") if step % 2 == 0 else ("b", "a")
        raw, seen, logged = before.rows[step]["all"], after.rows[step]["all"], after.rows[step]["logged"]
        assert set(logged) == {stepped}  # logs what this optimizer's step balanced
        assert torch.equal(seen[other], raw[other])  # the other optimizer's encoder is left for its own step
        assert not torch.equal(seen[stepped], raw[stepped])
        # Balanced once: the logged norms are those of the gradient the step received and of the one it steps with.
        assert logged[stepped]["grad_norm_before"] == pytest.approx(raw[stepped].norm().item(), rel=1e-5)
        assert logged[stepped]["grad_norm_after"] == pytest.approx(seen[stepped].norm().item(), rel=1e-5)
    if method == "agm":
        assert balancer.state_dict()["agm_steps"] == 2  # the running means advance once per batch
    if method == "mmpareto":
        assert balancer.balancing_method._unimodal == {}  # each optimizer's step took its unimodal gradients


def pre_strategy_layout(state):
    """The balancer's state as checkpoints held it before the methods became BalancingMethod classes: the same four
    keys for every method and no "method" key (AGM's running means empty for the others)."""
    return {"pending": state.get("pending"), "stepped": state["stepped"], "running": state.get("running", {}),
            "agm_steps": state.get("agm_steps", 0)}


@pytest.mark.parametrize("method", METHODS)
def test_a_checkpoint_of_the_earlier_layout_resumes_exactly(make_diag_trainer, tmp_path, method):
    """Resumed at an epoch boundary (where a plain DataLoader gives the same data as the uninterrupted run) from a
    checkpoint whose balancer state has the earlier layout: the same weights and state as without the interruption."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def train(checkpoint=None):
        callbacks = [ModalityBalancer(method, alpha=0.5)]
        if checkpoint is None:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, save_on_train_epoch_end=True))
        model = tiny_classifier(aux_loss_weight=aux_weight(method))
        trainer = make_diag_trainer(max_epochs=3, callbacks=callbacks, enable_checkpointing=checkpoint is None,
                                    num_sanity_val_steps=0)
        trainer.fit(model, train_dataloaders=loader(), ckpt_path=checkpoint)
        return model, callbacks[0]

    full, balancer = train()
    (path,) = (tmp_path / "ckpt").glob("epoch=0-*.ckpt")
    saved = torch.load(path, weights_only=False)
    assert saved["callbacks"]["ModalityBalancer"]["method"] == method
    saved["callbacks"]["ModalityBalancer"] = pre_strategy_layout(saved["callbacks"]["ModalityBalancer"])
    torch.save(saved, tmp_path / "earlier.ckpt")
    resumed, resumed_balancer = train(str(tmp_path / "earlier.ckpt"))
    assert resumed_balancer.state_dict() == balancer.state_dict()
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_the_state_of_another_method_is_not_loaded():
    agm = ModalityBalancer("agm")
    agm.load_state_dict({"method": "agm", "pending": [1.0, 2.0, 8.0], "stepped": False, "running": {"a": 0.5},
                         "agm_steps": 3})
    ogm = ModalityBalancer("ogm")
    with pytest.warns(UserWarning, match=r"state of method='agm', not of method='ogm'; 'ogm' starts from a fresh"):
        ogm.load_state_dict(agm.state_dict())
    assert ogm.state_dict() == ModalityBalancer("ogm").state_dict()


@pytest.mark.parametrize("method", METHODS)
def test_each_method_takes_its_hyperparameters_from_the_balancer(method):
    """A method's __init__ names only ModalityBalancer arguments, and receives their validated values."""
    import inspect

    arguments = {"alpha": 0.3, "smooth": True, "seed": 7, "clamp": [0.2, 5], "max_gap": 3, "gamma": 1.2}
    balancer = ModalityBalancer(method, **arguments)
    accepted = set(inspect.signature(type(balancer.balancing_method)).parameters)
    assert accepted <= set(inspect.signature(ModalityBalancer).parameters) - {"method"}
    validated = {**arguments, "clamp": (0.2, 5.0), "max_gap": 3.0}
    assert {name: getattr(balancer.balancing_method, name) for name in accepted} == {
        name: validated[name] for name in accepted}
    assert balancer.balancing_method.name == method
