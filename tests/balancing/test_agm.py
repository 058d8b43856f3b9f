"""AGM functional core against hand-computed values, and ModalityBalancer(method="agm") in a Trainer."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from torch.utils.data import DataLoader

from ml_optim_plugins import ConcatFusion, ModalityBalancer, MultimodalClassifier
from ml_optim_plugins.functional import agm_coefficients, mono_modal_losses
from ml_optim_plugins.balancing.agm import agm_ratios, update_running
from tests.balancing.test_balancer import first_batch, fit
from tests.balancing.tiny import imbalanced_samples, tiny_classifier


def reference_coefficients(scores, running, alpha, cap=None):
    """The authors' formula, written out as their scripts do: the gap to the mean scaled by 2 for two modalities
    (run/AVMNIST_main.py, run/MOSEI_main.py; exp(s_other - s_u) in run/CREMAD_main.py, run/AVE_main.py) and by 3/2 for
    three (run/URFunny_main.py), capped as min(t - r, cap) in run/CREMAD_main.py (10) and run/URFunny_main.py (7)."""
    scale = {2: 2.0, 3: 3 / 2}[len(scores)]
    mean, mean_running = sum(scores.values()) / len(scores), sum(running.values()) / len(running)
    out = {}
    for m in scores:
        gap = math.exp((mean_running - running[m]) * scale) - math.exp((mean - scores[m]) * scale)
        out[m] = math.exp(alpha * (gap if cap is None else min(gap, cap)))
    return out


def test_mono_modal_losses_clamp_the_true_class_probability():
    logits = {"a": torch.tensor([[0.0, 0.0], [0.0, -100.0]])}
    assert mono_modal_losses(logits, torch.tensor([0, 1]))["a"].item() == pytest.approx(math.log(2) - math.log(1e-8))


def test_coefficients_by_hand():
    k = agm_coefficients({"a": 0.2, "b": 1.0}, {"a": 0.5, "b": 0.7}, alpha=1.0)
    assert k["a"] == pytest.approx(math.exp(math.exp(0.2) - math.exp(0.8)))
    assert k["b"] == pytest.approx(math.exp(math.exp(-0.2) - math.exp(-0.8)))
    # two modalities: the reference's exp(s_other - s_u) current ratio
    assert math.exp(2 * ((0.2 + 1.0) / 2 - 0.2)) == pytest.approx(math.exp(1.0 - 0.2))


def test_three_modalities_scale_the_gap_by_three_halves_as_the_reference():
    scores, running = {"v": 0.3, "a": 0.9, "t": 1.4}, {"v": 0.6, "a": 0.8, "t": 1.1}
    assert agm_coefficients(scores, running, alpha=0.7) == pytest.approx(reference_coefficients(scores, running, 0.7))
    # the mean gap to the other modalities: exp(((0.9 - 0.3) + (1.4 - 0.3)) / 2) for "v"
    assert agm_ratios(scores)["v"] == pytest.approx(math.exp(0.85))


@pytest.mark.parametrize("scores, running", [({"a": 0.2, "b": 1.0}, {"a": 0.5, "b": 0.7}),
                                             ({"v": 0.1, "a": 2.5, "t": 0.9}, {"v": 1.2, "a": 0.4, "t": 0.6})])
@pytest.mark.parametrize("cap", [None, 10.0, 7.0, 0.5])
def test_coefficients_match_the_reference_scripts(scores, running, cap):
    expected = reference_coefficients(scores, running, alpha=1.5, cap=cap)
    assert agm_coefficients(scores, running, alpha=1.5, max_gap=cap) == pytest.approx(expected)


def test_max_gap_caps_the_exponent_before_alpha_and_only_from_above():
    scores, running = {"a": 3.0, "b": 0.0}, {"a": 0.0, "b": 3.0}  # "a" far behind its usual standing, "b" far ahead
    uncapped = agm_coefficients(scores, running, alpha=0.5)
    capped = agm_coefficients(scores, running, alpha=0.5, max_gap=7.0)
    assert uncapped["a"] > math.exp(0.5 * 7.0) and capped["a"] == pytest.approx(math.exp(0.5 * 7.0))
    assert capped["b"] == uncapped["b"] < 1  # the reference caps the speed-up only


def test_clamp_bounds_the_exponential():
    k = agm_coefficients({"a": 0.0, "b": 5.0}, {"a": 5.0, "b": 0.0}, alpha=3.0, clamp=(0.1, 10.0))
    assert k == {"a": 0.1, "b": 10.0}


def test_balanced_modalities_at_their_usual_standing_keep_one():
    assert agm_coefficients({"a": 0.4, "b": 0.9}, {"a": 0.4, "b": 0.9}, alpha=2.0) == pytest.approx({"a": 1.0, "b": 1.0})


def test_running_mean_is_cumulative():
    running = {}
    for count, value in enumerate([1.0, 3.0, 5.0], start=1):
        running = update_running(running, {"a": value}, count)
    assert running == {"a": pytest.approx(3.0)}


def test_first_step_slows_the_leader_and_speeds_up_the_laggard(make_diag_trainer):
    balancer = ModalityBalancer("agm", alpha=0.5, clamp=None)
    fit(make_diag_trainer, [balancer])
    reference = tiny_classifier()
    batch = first_batch()
    reference.training_step(batch, 0)
    losses = {m: v.item() / 16 for m, v in mono_modal_losses(reference.modality_logits, batch["label"]).items()}
    expected = agm_coefficients(losses, {"a": 0.0, "b": 0.0}, 0.5)
    assert expected["a"] < 1 < expected["b"]
    assert {m: balancer.last[m]["coefficient"] for m in "ab"} == pytest.approx(expected, rel=1e-5)
    state = balancer.state_dict()
    assert state["agm_steps"] == 1 and state["running"] == pytest.approx(losses, rel=1e-5)
    restored = ModalityBalancer("agm")
    restored.load_state_dict(state)
    assert restored.state_dict() == state


def test_bad_clamp_is_rejected():
    with pytest.raises(ValueError, match="clamp must be"):
        ModalityBalancer("agm", clamp=(2.0, 3.0))
    with pytest.raises(ValueError, match="max_gap must be a finite number > 0"):
        ModalityBalancer("agm", max_gap=0.0)


def test_three_modalities_in_a_trainer_follow_the_reference(make_diag_trainer):
    torch.manual_seed(0)
    dims = {"a": 4, "b": 6, "c": 5}
    model = MultimodalClassifier(
        {m: torch.nn.Linear(d, 8) for m, d in dims.items()}, fusion=ConcatFusion(), num_classes=3,
        feature_dims=dict.fromkeys(dims, 8), optimizer=lambda params: torch.optim.SGD(params, lr=0.5),
    )
    g = torch.Generator().manual_seed(2)
    samples = [dict(s, c=torch.randn(5, generator=g)) for s in imbalanced_samples(16)]
    reference = copy.deepcopy(model)
    balancer = ModalityBalancer("agm", alpha=0.5, clamp=None)
    trainer = make_diag_trainer(max_steps=1, callbacks=[balancer], num_sanity_val_steps=0)
    trainer.fit(model, train_dataloaders=DataLoader(samples, batch_size=16))
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    reference.training_step(batch, 0)
    losses = {m: v.item() / 16 for m, v in mono_modal_losses(reference.modality_logits, batch["label"]).items()}
    expected = reference_coefficients(losses, dict.fromkeys(dims, 0.0), 0.5)
    assert {m: balancer.last[m]["coefficient"] for m in dims} == pytest.approx(expected, rel=1e-5)
    mean = sum(losses.values()) / 3
    assert {m: balancer.last[m]["ratio"] for m in dims} == pytest.approx(
        {m: math.exp((mean - loss) * 3 / 2) for m, loss in losses.items()}, rel=1e-5)


def test_resume_continues_the_running_means_exactly(make_diag_trainer, tmp_path):
    """Resumed at an epoch boundary (a plain DataLoader cannot be fast-forwarded mid-epoch, so only there is the data
    after the resume the same as in the uninterrupted run), the running means and the weights match exactly."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.balancing.tiny import loader

    def train(checkpoint=None, save=False):
        callbacks = [ModalityBalancer("agm", alpha=0.5)]
        if save:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, save_on_train_epoch_end=True))
        model = tiny_classifier()
        trainer = make_diag_trainer(max_epochs=3, callbacks=callbacks, enable_checkpointing=save,
                                    num_sanity_val_steps=0)
        trainer.fit(model, train_dataloaders=loader(), ckpt_path=checkpoint)
        return model, callbacks[0]

    full, balancer = train(save=True)
    (path,) = (tmp_path / "ckpt").glob("epoch=0-*.ckpt")
    resumed, resumed_balancer = train(checkpoint=str(path))
    assert balancer.state_dict()["agm_steps"] == 12
    assert resumed_balancer.state_dict() == balancer.state_dict()
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
