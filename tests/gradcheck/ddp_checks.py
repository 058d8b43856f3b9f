"""Run by test_ddp.py as ``python ddp_checks.py OUT_DIR BUG``: 2-process DDP on CPU with the gradient check, the
gradient monitor, the overfit check, the curves and the curvature probe; each rank writes what it saw."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger

from ml_optim_plugins import CurvatureProbe, GradientCheck, GradientMonitor, OverfitBatchCheck, TrainingCurves
from ml_optim_plugins.process_group import destroy_default_process_group
from tests.gradcheck.planted import CustomLightning

if __name__ == "__main__":
    out, bug = Path(sys.argv[1]), sys.argv[2]
    check, overfit, curves = GradientCheck(), OverfitBatchCheck(steps=30, lr=0.5, max_loss_ratio=0.5), TrainingCurves()
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, limit_train_batches=2, logger=CSVLogger(out),
        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[check, GradientMonitor(), overfit, curves, CurvatureProbe(iters=4)],
    )
    model = CustomLightning(bug)
    trainer.fit(model)
    seen = {
        "ran_check": check.last_report is not None,
        "checked_epochs": check.checked_epochs,
        "overfit_passed": overfit.passed,
        "overfit_losses": overfit.losses,
        "curves": str(curves.path) if curves.path else None,
        "weights": [p.detach().flatten().tolist() for p in model.parameters()],
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(seen))
    destroy_default_process_group()  # before exit: gloo threads at interpreter shutdown abort the process
