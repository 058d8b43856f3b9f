"""One non-finite policy across MultimodalClassifier, GradientMonitor and ModalityBalancer (issue 16): without a
monitor every NaN stops the run; GradientMonitor(on_nonfinite=...) decides for all three; evaluation always raises."""

from __future__ import annotations

import json
import math

import lightning.pytorch as pl
import pytest
import torch

from ml_optim_plugins import GradientMonitor, ModalityBalancer
from ml_optim_plugins.nonfinite import nonfinite_policy
from tests.balancing.tiny import loader, tiny_classifier
from tests.conftest import WeightWatch

NAN_STEP = 1


def nan_loss_model(when: str = "train", **kwargs):
    """The tiny two-modality classifier whose loss is NaN at training step NAN_STEP (``when="train"``) or in every
    evaluation step (``when="eval"``)."""
    model = tiny_classifier(**kwargs)
    loss = model.compute_loss

    def compute_loss(logits, targets):
        value = loss(logits, targets)
        hit = model.global_step == NAN_STEP if when == "train" and model.training else when == "eval" and not model.training
        return value * float("nan") if hit else value

    model.compute_loss = compute_loss
    return model


def fit(make_diag_trainer, model, callbacks, steps: int = 4):
    trainer = make_diag_trainer(max_steps=steps, callbacks=callbacks)
    trainer.fit(model, train_dataloaders=loader())
    return trainer


def test_the_policy_is_the_monitors_or_raise():
    assert nonfinite_policy(None) == "raise"
    assert nonfinite_policy(pl.Trainer(callbacks=[ModalityBalancer()], logger=False)) == "raise"
    trainer = pl.Trainer(callbacks=[ModalityBalancer(), GradientMonitor(on_nonfinite="warn")], logger=False)
    assert nonfinite_policy(trainer) == "warn"


@pytest.mark.parametrize("callbacks", [[], [GradientMonitor()], [ModalityBalancer("ogm_ge")]],
                         ids=["classifier alone", "monitor raise", "balancer, no monitor"])
def test_a_nan_training_loss_stops_the_run_by_default(make_diag_trainer, callbacks):
    with pytest.raises(FloatingPointError, match=rf"train loss is nan at global step {NAN_STEP}; .*"
                                                 r"GradientMonitor\(on_nonfinite='skip_step'\) to skip such steps"):
        fit(make_diag_trainer, nan_loss_model(), callbacks)


@pytest.mark.parametrize(
    ("balancer", "monitor_first"),
    [(None, True), ("ogm_ge", True), ("ogm_ge", False), ("agm", True), ("agm", False), ("mmpareto", False)],
)
def test_skip_step_skips_the_nan_step_with_or_without_a_balancer(make_diag_trainer, balancer, monitor_first):
    """The classifier defers to the monitor, which drops the step's gradients (in either callback order, so the
    balancer never rescales them); AGM's running means never see the NaN; training goes on with finite weights."""
    monitor, watch = GradientMonitor(on_nonfinite="skip_step"), WeightWatch()
    extra = [] if balancer is None else [ModalityBalancer(balancer, alpha=0.5)]
    callbacks = [monitor, *extra] if monitor_first else [*extra, monitor]
    model = nan_loss_model(aux_loss_weight=1.0 if balancer == "mmpareto" else 0.0)
    with pytest.warns(UserWarning, match=rf"non-finite loss and gradients at step {NAN_STEP} in .*step skipped"):
        trainer = fit(make_diag_trainer, model, [*callbacks, watch])
    assert trainer.global_step == 4 and monitor.skipped_steps == 1
    assert watch.changed == [True, False, True, True]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))  # the skipped step's NaN was not logged
    if balancer == "agm":
        running = extra[0].state_dict()["running"]
        assert running and all(math.isfinite(v) for v in running.values())


def test_warn_lets_the_step_through_and_says_so(make_diag_trainer):
    monitor = GradientMonitor(on_nonfinite="warn")
    with pytest.warns(UserWarning, match=rf"GradientMonitor: non-finite loss and gradients at step {NAN_STEP}"):
        fit(make_diag_trainer, nan_loss_model(), [monitor, ModalityBalancer("ogm_ge")], steps=2)
    assert monitor.nonfinite_steps == 1 and monitor.skipped_steps == 0


def test_evaluation_raises_whatever_the_policy(make_diag_trainer):
    trainer = make_diag_trainer(callbacks=[GradientMonitor(on_nonfinite="skip_step")], limit_val_batches=1)
    with pytest.raises(FloatingPointError, match="val loss is nan at global step 0; .*check the inputs"):
        trainer.validate(nan_loss_model(when="eval"), dataloaders=loader())


class NaNEncoderGradient(pl.Callback):
    """A finite loss whose gradient in encoder 'a' is NaN (sqrt'(0) * 0) at step NAN_STEP: only the balancer sees it."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pl_module.nan_now = trainer.global_step == NAN_STEP


def test_the_balancer_never_rescales_nonfinite_gradients(make_diag_trainer):
    model = tiny_classifier()
    loss = model.compute_loss

    def compute_loss(logits, targets):
        value = loss(logits, targets)
        if model.training and getattr(model, "nan_now", False):
            value = value + torch.sqrt(model.encoders["a"].weight.sum() * 0)  # finite value, NaN gradient
        return value

    model.compute_loss = compute_loss
    with pytest.raises(FloatingPointError, match=rf"ModalityBalancer: non-finite gradients in the \['a'\] encoder\(s\) "
                                                 rf"at step {NAN_STEP}; the step is not balanced"):
        fit(make_diag_trainer, model, [NaNEncoderGradient(), ModalityBalancer("ogm_ge")])


@pytest.mark.parametrize("model", ["custom", "classifier"])
def test_ddp_ranks_skip_the_same_step_when_one_ranks_loss_is_nan(run_ddp_ranks, tmp_path, model):
    """A loss is each rank's own: GradientMonitor agrees the verdict across ranks, so both skip step 1 and the weights
    stay identical (a rank-local verdict would step rank 0 only); the classifier skips its logging (a collective under
    sync_dist) on both ranks together, so neither waits for the other."""
    from pathlib import Path

    run_ddp_ranks(str(Path(__file__).with_name("ddp_nonfinite.py")), str(tmp_path), model, timeout=240)
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["skipped"] == rank1["skipped"] == 1
    assert rank0["changed"] == rank1["changed"] == [True, False, True]
    assert rank0["weights"] == rank1["weights"]
