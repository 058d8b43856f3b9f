"""OverfitBatchCheck, TrainingCurves (and RunReport's training loss), hessian_top_eigenvalue and CurvatureProbe."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from lightning.pytorch.utilities.exceptions import MisconfigurationException

from ml_optim_plugins import (
    CurvatureProbe,
    GradientCheck,
    OverfitBatchCheck,
    RunReport,
    TrainingCurves,
    WarmupDecay,
)
from ml_optim_plugins.functional import hessian_top_eigenvalue
from tests.gradcheck.planted import CustomLightning, classification_loss


def test_overfit_check_passes_and_leaves_the_run_untouched(make_diag_trainer):
    torch.manual_seed(3)
    plain = CustomLightning(lr=0.5)
    make_diag_trainer(max_steps=4).fit(plain)
    torch.manual_seed(3)
    checked = CustomLightning(lr=0.5)
    callback = OverfitBatchCheck(steps=40, max_loss_ratio=0.3)
    trainer = make_diag_trainer(max_steps=4, callbacks=[callback])
    trainer.fit(checked)
    assert callback.passed and len(callback.losses) == 40 and callback.losses[-1] < 0.3 * callback.losses[0]
    for a, b in zip(plain.parameters(), checked.parameters()):
        assert torch.equal(a, b)  # same weights, same data order: the check ran on a copy in its own RNG stream
    assert (Path(trainer.log_dir) / "overfit_check.png").stat().st_size > 5000
    rows = list(csv.DictReader((Path(trainer.log_dir) / "metrics.csv").open()))
    assert sum(1 for r in rows if r.get("overfit_check/loss")) == 40


def test_overfit_check_fails_with_advice_before_training(make_diag_trainer):
    trainer = make_diag_trainer(max_steps=4, callbacks=[OverfitBatchCheck(steps=10, lr=0.0)])
    with pytest.raises(RuntimeError, match=r"OverfitBatchCheck failed: in 10 steps on 1 fixed batch.*learning rate.*"
                                           r"of \d[\d,]* parameters are trainable"):
        trainer.fit(CustomLightning())
    assert trainer.global_step == 0


def test_overfit_check_is_skipped_on_resume(make_diag_trainer):
    callback = OverfitBatchCheck(steps=8, max_loss_ratio=0.99, on_failure="warn")
    callback.load_state_dict({"losses": [1.0, 0.5], "passed": True})
    make_diag_trainer(max_steps=1, callbacks=[callback]).fit(CustomLightning())
    assert callback.losses == [1.0, 0.5]


@pytest.mark.parametrize("kwargs, message", [({"steps": 2}, "steps >= 4"), ({"max_loss_ratio": 1.5}, r"in \(0, 1\)"),
                                             ({"on_failure": "stop"}, "on_failure='stop'")])
def test_overfit_check_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OverfitBatchCheck(**kwargs)


def test_training_curves_plot_losses_and_lrs_and_survive_resume(make_diag_trainer, tmp_path):
    curves = TrainingCurves(smoothing=3)
    trainer = make_diag_trainer(max_epochs=2, limit_train_batches=4,
                                callbacks=[curves, WarmupDecay(warmup_steps=2, decay="linear")])
    trainer.fit(CustomLightning())
    assert curves.path == Path(trainer.log_dir) / "curves.png" and curves.path.stat().st_size > 10_000
    assert [s for s, _ in curves.train_loss] == list(range(1, 9))
    assert list(curves.lrs) == ["net"]  # named by WarmupDecay
    assert curves.lrs["net"][:3] == [(0, 0.0), (1, pytest.approx(0.05)), (2, pytest.approx(0.1))]
    restored = TrainingCurves()
    restored.load_state_dict(curves.state_dict())
    assert restored.train_loss == curves.train_loss and dict(restored.lrs) == dict(curves.lrs)


def test_training_curves_record_validation_losses(tiny_model, tiny_datamodule, make_diag_trainer):
    curves = TrainingCurves()
    trainer = make_diag_trainer(max_epochs=2, limit_train_batches=1, limit_val_batches=1, callbacks=[curves])
    trainer.fit(tiny_model, tiny_datamodule)
    assert "val/loss" in curves.val and len(curves.val["val/loss"]) == 2
    assert "val/image/loss" in curves.val and curves.path.is_file()
    assert set(curves.lrs) == {"encoders.image", "encoders.text", "fusion"}


class LossRecorder(CustomLightning):
    """CustomLightning that keeps every loss it logs, to compare with what the plots record."""

    def __init__(self) -> None:
        super().__init__(shuffle=False)
        self.logged: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.logged.append(loss.item())
        return loss


@pytest.mark.parametrize("accumulate", [1, 2, 4])
def test_plotted_training_loss_is_the_logged_loss_under_accumulation(make_diag_trainer, accumulate):
    # Lightning hands callbacks the loss divided by accumulate_grad_batches; the plots must show the module's loss.
    curves, report, model = TrainingCurves(), RunReport(), LossRecorder()
    trainer = make_diag_trainer(max_epochs=1, limit_train_batches=8, accumulate_grad_batches=accumulate,
                                callbacks=[curves, report])
    trainer.fit(model)
    assert [loss for _, loss in curves.train_loss] == pytest.approx(model.logged, rel=1e-6)
    reported = [loss for _, loss in report.history.series("train/loss")]
    assert reported and all(any(loss == pytest.approx(x, rel=1e-6) for x in model.logged) for loss in reported)


def quadratic(module, batch):
    return 0.5 * (module.w * batch * module.w).sum()  # Hessian diag(batch)


def test_top_and_bottom_eigenvalues_of_a_known_hessian():
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(torch.ones(4))
    result = hessian_top_eigenvalue(module, torch.tensor([3.0, -2.0, 1.0, 0.5]), quadratic, iters=200, tol=1e-10,
                                    bottom=True)
    assert result.top == pytest.approx(3.0, rel=1e-4) and result.bottom == pytest.approx(-2.0, rel=1e-4)


def test_top_eigenvalue_matches_the_exact_hessian_of_a_small_network():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    loss = lambda m, b: (m(b[0]) - b[1]).pow(2).mean()  # noqa: E731
    params = list(net.parameters())
    flat = torch.cat([p.detach().flatten() for p in params])

    def as_function(vector):
        chunks, offset = {}, 0
        for (name, p) in net.named_parameters():
            chunks[name] = vector[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        return (torch.func.functional_call(net, chunks, (x,)) - y).pow(2).mean()

    exact = torch.linalg.eigvalsh(torch.autograd.functional.hessian(as_function, flat))
    result = hessian_top_eigenvalue(net, (x, y), loss, iters=500, tol=1e-10, bottom=True)
    assert result.top == pytest.approx(exact.max().item(), rel=1e-3)
    assert result.bottom == pytest.approx(exact.min().item(), rel=1e-2, abs=1e-3)


def test_curvature_probe_logs_every_epoch(make_diag_trainer):
    probe = CurvatureProbe(iters=5)
    trainer = make_diag_trainer(max_epochs=2, limit_train_batches=2, callbacks=[probe])
    trainer.fit(CustomLightning())
    assert [h["epoch"] for h in probe.history] == [0, 1] and all(h["top"] > 0 for h in probe.history)
    assert "curvature/top_eigenvalue" in trainer.callback_metrics


class ManualCustomLightning(CustomLightning):
    """The same model with manual optimization: its training_step steps the optimizer itself."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        loss = classification_loss(self.net, batch)
        self.manual_backward(loss)
        optimizer.step()


@pytest.mark.parametrize(
    "make",
    [
        lambda loss_fn: GradientCheck(loss_fn=loss_fn) if loss_fn else GradientCheck(),
        lambda loss_fn: CurvatureProbe(iters=3, loss_fn=loss_fn),
    ],
    ids=["GradientCheck", "CurvatureProbe"],
)
def test_manual_optimization_needs_a_loss_fn_and_works_with_one(make_diag_trainer, make):
    trainer = make_diag_trainer(max_epochs=1, limit_train_batches=2, callbacks=[make(None)])
    with pytest.raises(MisconfigurationException, match=r"manual optimization.*pass \w+\(loss_fn="):
        trainer.fit(ManualCustomLightning())
    assert trainer.global_step == 0  # refused before the first step
    callback = make(lambda module, batch: classification_loss(module.net, batch))
    trainer = make_diag_trainer(max_epochs=1, limit_train_batches=2, callbacks=[callback])
    trainer.fit(ManualCustomLightning())
    assert trainer.global_step == 2
    if isinstance(callback, GradientCheck):
        assert callback.last_report.passed and callback.checked_epochs == [0]
    else:
        assert callback.history[0]["top"] > 0
