"""Run by test_nonfinite.py as ``python ddp_nonfinite.py OUT_DIR``: 2-process DDP on CPU where only rank 1's loss is
NaN at step 1, with finite gradients (a NaN constant added to the loss), under GradientMonitor(on_nonfinite=
"skip_step"); each rank writes what it did."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from ml_optim_plugins import GradientMonitor, destroy_default_process_group
from tests.conftest import WeightWatch
from tests.gradcheck.planted import CustomLightning


class NaNLossOnRankOne(CustomLightning):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.global_step == 1 and self.global_rank == 1:
            loss = loss + torch.tensor(float("nan"))  # the loss is NaN, its gradients are not
        return loss


if __name__ == "__main__":
    out = Path(sys.argv[1])
    monitor, watch = GradientMonitor(on_nonfinite="skip_step"), WeightWatch()
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[monitor, watch],
    )
    model = NaNLossOnRankOne()
    trainer.fit(model)
    seen = {"changed": watch.changed, "skipped": monitor.skipped_steps,
            "weights": [p.detach().flatten().tolist() for p in model.parameters()]}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(seen))
    destroy_default_process_group()  # before exit: gloo threads at interpreter shutdown abort the process
