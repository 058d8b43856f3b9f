"""GradientCheck and GradientMonitor in a real Trainer."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from ml_optim_plugins import GradientCheck, GradientMonitor
from tests.gradcheck.planted import CustomLightning


def logged_columns(trainer) -> set[str]:
    path = Path(trainer.logger.log_dir) / "metrics.csv"
    return set(next(csv.reader(path.open())))


def test_gradient_check_passes_saves_the_report_and_does_not_change_training(make_diag_trainer):
    torch.manual_seed(1)
    plain = CustomLightning()
    make_diag_trainer(max_steps=3).fit(plain)
    torch.manual_seed(1)
    checked = CustomLightning()
    callback = GradientCheck()
    trainer = make_diag_trainer(max_steps=3, callbacks=[callback])
    trainer.fit(checked)
    assert callback.last_report.passed and callback.checked_epochs == [0]
    report = json.loads((Path(trainer.log_dir) / "gradcheck-epoch0.json").read_text())
    assert report["passed"] and len(report["tensors"]) == 5
    assert {"gradcheck/passed", "gradcheck/failed_tensors", "gradcheck/max_rel_error/shared"} <= logged_columns(trainer)
    for a, b in zip(plain.parameters(), checked.parameters()):
        assert torch.equal(a, b)  # same data order, same updates: the check touched nothing


def test_gradient_check_raises_naming_the_worst_modules_before_the_first_step(make_diag_trainer):
    trainer = make_diag_trainer(max_steps=3, callbacks=[GradientCheck()])
    with pytest.raises(RuntimeError, match=r"gradient check failed at epoch 0: 1 of 5 tensors.*worst modules: net.custom"):
        trainer.fit(CustomLightning("sign"))
    assert trainer.global_step == 0


def test_gradient_check_can_warn_and_go_on(make_diag_trainer):
    callback = GradientCheck(on_failure="warn", every_n_epochs=2)
    trainer = make_diag_trainer(max_epochs=3, limit_train_batches=2, callbacks=[callback])
    with pytest.warns(UserWarning, match="gradient check failed at epoch 0"):
        trainer.fit(CustomLightning("scaled"))
    assert callback.checked_epochs == [0, 2] and trainer.global_step == 6
    assert callback.state_dict() == {"checked_epochs": [0, 2]}


def test_gradient_check_rejects_unknown_arguments():
    with pytest.raises(ValueError, match=r"unknown check argument\(s\) \['tolerance'\]"):
        GradientCheck(tolerance=1e-3)
    with pytest.raises(ValueError, match="on_failure='stop'"):
        GradientCheck(on_failure="stop")


def test_monitor_logs_norms_per_module_and_the_update_ratio(make_diag_trainer):
    monitor = GradientMonitor(log_every_n_steps=2, depth=2)
    model = CustomLightning()
    trainer = make_diag_trainer(max_steps=4, callbacks=[monitor])
    trainer.fit(model)
    columns = logged_columns(trainer)
    assert {"grad_norm/net.encoder", "grad_norm/net.custom", "grad_norm/net.head", "grad_norm/total"} <= columns
    assert {"update_ratio/net.encoder", "update_ratio/net.head"} <= columns
    rows = [r for r in csv.DictReader((Path(trainer.logger.log_dir) / "metrics.csv").open()) if r.get("update_ratio/net.head")]
    assert len(rows) == 2  # steps 0 and 2
    # SGD: the update is lr * grad, so the ratio is lr * ||g|| / ||w|| at that step
    assert 0 < float(rows[0]["update_ratio/net.head"]) < 1


def test_monitor_groups_by_modality(tiny_model, tiny_datamodule, make_diag_trainer):
    trainer = make_diag_trainer(max_steps=1, callbacks=[GradientMonitor(update_ratio=False)])
    trainer.fit(tiny_model, tiny_datamodule)
    assert {"grad_norm/modality/image", "grad_norm/modality/text", "grad_norm/modality/shared",
            "grad_norm/encoders.image", "grad_norm/fusion.head"} <= logged_columns(trainer)


class NaNAt(CustomLightning):
    """Produces a NaN gradient in the head at step 2."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.global_step == 2:
            loss = loss + self.net.head.weight.sum() * float("nan")
        return loss


def test_nonfinite_gradients_raise_naming_the_module(make_diag_trainer):
    trainer = make_diag_trainer(max_steps=5, callbacks=[GradientMonitor()])
    with pytest.raises(FloatingPointError, match=r"non-finite loss and gradients at step 2 in net.head \(nan\)"):
        trainer.fit(NaNAt())


def test_nonfinite_gradients_can_be_skipped(make_diag_trainer):
    import lightning.pytorch as pl

    class Watch(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.before = [p.detach().clone() for p in pl_module.parameters()]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            changed = any(not torch.equal(a, p) for a, p in zip(self.before, pl_module.parameters()))
            self.changed = [*getattr(self, "changed", []), changed]

    monitor, watch, model = GradientMonitor(on_nonfinite="skip_step"), Watch(), NaNAt()
    trainer = make_diag_trainer(max_steps=5, callbacks=[monitor, watch])
    with pytest.warns(UserWarning, match="non-finite loss and gradients at step 2 in net.head .*step skipped"):
        trainer.fit(model)
    assert monitor.skipped_steps == 1 and watch.changed == [True, True, False, True, True, True][: len(watch.changed)]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_vanishing_and_exploding_gradients_are_flagged_once():
    monitor = GradientMonitor(vanishing=1e-3, exploding=10.0)
    with pytest.warns(UserWarning) as warned:
        monitor._flag({"a": torch.tensor(1e-5), "b": torch.tensor(50.0), "c": torch.tensor(1.0)}, step=7)
        monitor._flag({"a": torch.tensor(1e-5)}, step=8)
    messages = [str(w.message) for w in warned]
    assert len(messages) == 2
    assert "vanishing gradients in 'a' at step 7" in messages[0] and "exploding gradients in 'b'" in messages[1]
    assert monitor.state_dict()["flagged"] == [["a", "vanishing"], ["b", "exploding"]]


def test_monitor_rejects_bad_arguments():
    with pytest.raises(ValueError, match="on_nonfinite='ignore'"):
        GradientMonitor(on_nonfinite="ignore")
    with pytest.raises(ValueError, match="need 0 <= vanishing < exploding"):
        GradientMonitor(vanishing=1.0, exploding=0.5)


def test_monitor_measures_the_update_of_every_optimizer_stepped_in_a_batch(make_diag_trainer):
    from tests.schedules.tiny_modules import TwoOptimizers

    class Taps(pl.Callback):  # the weights each batch started from and ended with
        def __init__(self):
            self.before, self.rows = {}, []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.rows.append({m: torch.linalg.vector_norm(torch.stack([
                torch.linalg.vector_norm(p.detach() - self.before[n]) for n, p in pl_module.named_parameters()
                if n.startswith(m)])) / torch.linalg.vector_norm(torch.stack([
                    torch.linalg.vector_norm(self.before[n]) for n in self.before if n.startswith(m)]))
                for m in ("body", "head")})

    taps = Taps()
    trainer = make_diag_trainer(max_epochs=1, limit_train_batches=4, callbacks=[GradientMonitor(log_every_n_steps=1), taps])
    trainer.fit(TwoOptimizers())
    rows = [r for r in csv.DictReader((Path(trainer.logger.log_dir) / "metrics.csv").open())
            if r.get("update_ratio/body") or r.get("update_ratio/head")]
    stepped = [{m for m in ("body", "head") if r.get(f"update_ratio/{m}")} for r in rows]
    # batches 0..3 step body, head, body, body + head (see TwoOptimizers)
    assert stepped == [{"body"}, {"head"}, {"body"}, {"body", "head"}]
    for row, expected in zip(rows, taps.rows):
        for module in ("body", "head"):
            if row.get(f"update_ratio/{module}"):
                assert float(row[f"update_ratio/{module}"]) == pytest.approx(expected[module].item(), rel=1e-5)
