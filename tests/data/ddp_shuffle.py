"""Run by test_distributed_evaluation.py as ``python ddp_shuffle.py OUT_DIR``, the 2 processes of a DDP run without
``seed_everything``, so each process starts with its own random torch seed: each rank writes that seed and the
training samples it saw in each epoch (``rank{global_rank}.json``)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from ml_optim_plugins import SyntheticSentimentDataModule
from ml_optim_plugins.process_group import destroy_default_process_group


class Recorder(pl.LightningModule):
    """Records each training batch's sample ids by epoch; its one weight never moves (LR 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: dict[int, list[int]] = {}

    def training_step(self, batch, batch_idx):
        self.seen.setdefault(self.current_epoch, []).extend(int(i) for i in batch["index"])
        return self.weight.sum() * batch["image"].mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    os.environ.pop("PL_GLOBAL_SEED", None)
    seed = torch.initial_seed()
    data = SyntheticSentimentDataModule(train_size=12, val_size=2, test_size=2, image_size=16, batch_size=3,
                                        tokenizer=None)
    model = Recorder()
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, data)
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({"seed": seed, "seen": model.seen}))
    destroy_default_process_group()  # before exit: gloo threads at interpreter shutdown abort the process
