"""Run by test_ddp.py as ``python ddp_lrs.py OUT_DIR``: a 2-process DDP fit on CPU (gloo) with WarmupDecay; each rank
writes the LRs it used at every optimizer step to ``OUT_DIR/lrs-rank{R}.json``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from ml_optim_plugins import WarmupDecay
from ml_optim_plugins.process_group import destroy_default_process_group
from tests.schedules.tiny_modules import AddGroupAt, LRRecorder, TwoLayer

if __name__ == "__main__":
    out = Path(sys.argv[1])
    torch.manual_seed(0)
    callback = WarmupDecay(warmup_ratio=0.25, decay="cosine", min_lr_ratio=0.1, lr_multipliers={"head": 0.5})
    recorder = LRRecorder()
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, limit_train_batches=6, accumulate_grad_batches=2,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[AddGroupAt(3), callback, recorder],
    )
    trainer.fit(TwoLayer())
    result = {"total": callback.resolved.total_steps, "warmup": callback.resolved.warmup_steps, "lrs": recorder.lrs[0]}
    (out / f"lrs-rank{trainer.global_rank}.json").write_text(json.dumps(result))
    destroy_default_process_group()  # before exit: gloo threads at interpreter shutdown abort the process
