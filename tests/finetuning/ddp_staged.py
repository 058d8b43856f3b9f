"""Run by test_ddp.py as ``python ddp_staged.py OUT_DIR MODE``: 2-process DDP on CPU; the encoders are frozen when DDP
wraps the model and unfrozen later. Each rank writes its parameters before and after training, which parameters the
callback synchronised itself, and the stage boundaries.

MODE: ``sync`` (unfreeze at epoch 1), ``nosync`` (the same without the callback's synchronisation: the control,
ranks diverge), ``plateau`` (unfreeze when a validation metric that each rank logs on its own, without sync_dist,
stops improving: rank 1's stalls, rank 0's does not), ``accumulate`` (as ``sync`` with 2 micro-batches per optimizer
step; the callback's synchronisations are counted), ``activations`` (as ``sync`` for 3 epochs with a splittable text
encoder and ``cache_activations=True``: the frozen lower text blocks are served from the cache from epoch 2 on) and
``activations-off`` (the same without the activation cache: the reference)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from ml_optim_plugins import Stage, StagedFinetuning, WarmupDecay
from ml_optim_plugins.process_group import destroy_default_process_group
from tests.finetuning.tiny import loader, tiny_staged_model


class RankMetric(pl.Callback):
    def on_validation_epoch_end(self, trainer, pl_module):
        value = trainer.current_epoch if trainer.global_rank == 0 else 0.0
        pl_module.log("val/rank_metric", float(value))


if __name__ == "__main__":
    out, mode = Path(sys.argv[1]), sys.argv[2]
    trigger = dict(monitor="val/rank_metric", mode="max", patience=1) if mode == "plateau" else dict(start_epoch=1)
    plan = StagedFinetuning([Stage(), Stage(trainable=["image", "text[-2:]"], warmup_steps=2, **trigger)],
                            cache_features=True, cache_activations=mode == "activations")
    if mode == "nosync":
        plan.unregistered.sync = lambda trainer, params: None
    sync_calls = []
    if mode == "accumulate":
        sync = plan.unregistered.sync
        plan.unregistered.sync = lambda trainer, params: (sync_calls.append(trainer.global_step), sync(trainer, params))
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=3 if mode in ("plateau", "activations", "activations-off") else 2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[plan, WarmupDecay(warmup_steps=2, decay="constant"), RankMetric()],
        accumulate_grad_batches=2 if mode == "accumulate" else 1,
    )
    model = tiny_staged_model(split_text=mode.startswith("activations"))
    model.encoders["image"].unused = torch.nn.Linear(2, 2)  # unfrozen with the encoder, never gets a gradient
    before = {n: p.detach().flatten().tolist() for n, p in model.named_parameters()}
    trainer.fit(model, train_dataloaders=loader(batch_size=4, shuffle=True), val_dataloaders=loader(n=16))
    after = {n: p.detach().flatten().tolist() for n, p in model.named_parameters()}
    unsynced = sorted(n for n, p in model.named_parameters() if any(p is q for q in plan.unregistered.params))
    result = {"before": before, "after": after, "unsynced": unsynced, "stage": plan.stage_index,
              "boundaries": plan.boundaries, "hits": plan.cache.stats(), "sync_calls": sync_calls,
              "activation_hits": None if plan.activation_cache is None else plan.activation_cache.stats()}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
    destroy_default_process_group()  # before exit: gloo threads at interpreter shutdown abort the process
