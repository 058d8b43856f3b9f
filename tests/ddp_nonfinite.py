"""Run by test_nonfinite.py as ``python ddp_nonfinite.py OUT_DIR MODEL``: 2-process DDP on CPU where only rank 1's
loss is NaN at step 1, under GradientMonitor(on_nonfinite="skip_step") and, for MODEL ``classifier``, OGM-GE; each
rank writes what it did. MODEL ``custom``: a plain module, the NaN a constant added to its loss (finite gradients).
MODEL ``classifier``: MultimodalClassifier, whose training loss is logged with sync_dist (a collective per step)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from ml_optim_plugins import GradientMonitor, ModalityBalancer
from ml_optim_plugins.process_group import destroy_default_process_group
from tests.balancing.tiny import imbalanced_samples, tiny_classifier
from tests.conftest import WeightWatch
from tests.gradcheck.planted import CustomLightning


class NaNLossOnRankOne(CustomLightning):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.global_step == 1 and self.global_rank == 1:
            loss = loss + torch.tensor(float("nan"))  # the loss is NaN, its gradients are not
        return loss


def classifier_nan_on_rank_one() -> pl.LightningModule:
    model = tiny_classifier()
    loss = model.compute_loss

    def compute_loss(logits, targets):
        value = loss(logits, targets)
        return value * float("nan") if model.training and model.global_step == 1 and model.global_rank == 1 else value

    model.compute_loss = compute_loss
    model.train_dataloader = lambda: torch.utils.data.DataLoader(imbalanced_samples(64), batch_size=8)
    return model


if __name__ == "__main__":
    out, kind = Path(sys.argv[1]), sys.argv[2]
    monitor, watch = GradientMonitor(on_nonfinite="skip_step"), WeightWatch()
    extra = [ModalityBalancer("ogm_ge")] if kind == "classifier" else []
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[monitor, *extra, watch],
    )
    model = NaNLossOnRankOne() if kind == "custom" else classifier_nan_on_rank_one()
    trainer.fit(model)
    seen = {"changed": watch.changed, "skipped": monitor.skipped_steps,
            "weights": [p.detach().flatten().tolist() for p in model.parameters()]}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(seen))
    destroy_default_process_group()  # before exit: gloo threads at interpreter shutdown abort the process
