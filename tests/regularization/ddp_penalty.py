"""Run by test_elastic_net.py as ``python ddp_penalty.py OUT_DIR``: a 2-process DDP fit on CPU with ElasticNetPenalty
and VariationalKL; each rank writes its final parameters to ``OUT_DIR/params-rank{R}.json``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl

from ml_optim_plugins import ElasticNetPenalty, VariationalKL
from ml_optim_plugins.process_group import destroy_default_process_group
from tests.regularization.tiny_modules import Regression

if __name__ == "__main__":
    out = Path(sys.argv[1])
    model = Regression(variational=True)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=4, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[ElasticNetPenalty(l1=0.01, l2=0.01), VariationalKL(warmup_steps=2)],
    )
    trainer.fit(model)
    params = {name: p.detach().flatten().tolist() for name, p in model.named_parameters()}
    (out / f"params-rank{trainer.global_rank}.json").write_text(json.dumps({"steps": trainer.global_step, **params}))
    destroy_default_process_group()  # before exit: gloo threads at interpreter shutdown abort the process
