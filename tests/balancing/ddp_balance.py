"""Run by test_ddp.py as ``python ddp_balance.py OUT_DIR [METHOD STEPS]``: 2-process DDP on CPU with ModalityBalancer
(default OGM-GE, 3 steps); each rank writes the statistics of the first step, the first batch's samples and its final
parameters."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl

from ml_optim_plugins import ModalityBalancer
from ml_optim_plugins.process_group import destroy_default_process_group
from tests.balancing.tiny import loader, tiny_classifier


class FirstStep(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0:
            self.a0 = batch["a"][:, 0].tolist()  # identifies the samples (Lightning's sampler shuffles them)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 1 and not hasattr(self, "stats"):
            self.stats = {m: dict(v) for m, v in balancer.last.items()}


if __name__ == "__main__":
    out = Path(sys.argv[1])
    method, steps = (sys.argv[2], int(sys.argv[3])) if len(sys.argv) > 2 else ("ogm_ge", 3)
    balancer, first = ModalityBalancer(method, alpha=0.5, parameters="all"), FirstStep()
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[balancer, first],
    )
    model = tiny_classifier(aux_loss_weight=1.0 if method == "mmpareto" else 0.0)
    trainer.fit(model, train_dataloaders=loader(batch_size=8))
    params = [p.detach().flatten().tolist() for p in model.parameters()]
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({"first": first.stats, "params": params, "a0": first.a0}))
    destroy_default_process_group()  # before exit: gloo threads at interpreter shutdown abort the process
