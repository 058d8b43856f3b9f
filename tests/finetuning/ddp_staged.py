"""Run by test_ddp.py as ``python ddp_staged.py OUT_DIR SYNC``: 2-process DDP on CPU; the encoders are frozen when
DDP wraps the model and unfrozen at epoch 1. Each rank writes its parameters before and after training, and which
parameters the callback synchronised itself. SYNC=0 disables that synchronisation (the control: ranks diverge)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl

from ml_optim_plugins import Stage, StagedFinetuning, WarmupDecay
from tests.finetuning.tiny import loader, tiny_staged_model

if __name__ == "__main__":
    out, sync = Path(sys.argv[1]), sys.argv[2] == "1"
    plan = StagedFinetuning([Stage(), Stage(start_epoch=1, trainable=["image", "text[-2:]"], warmup_steps=2)],
                            cache_features=True)
    if not sync:
        plan.on_after_backward = lambda trainer, pl_module: None
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[plan, WarmupDecay(warmup_steps=2, decay="constant")],
    )
    model = tiny_staged_model()
    before = {n: p.detach().flatten().tolist() for n, p in model.named_parameters()}
    trainer.fit(model, train_dataloaders=loader(batch_size=4, shuffle=True))
    after = {n: p.detach().flatten().tolist() for n, p in model.named_parameters()}
    unsynced = sorted(n for n, p in model.named_parameters() if any(p is q for q in plan._unsynced))
    result = {"before": before, "after": after, "unsynced": unsynced, "stage": plan.stage_index,
              "hits": plan.cache.stats()}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
