from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest


@pytest.fixture
def make_penalty_trainer(tmp_path: Path):
    """A quiet CPU Trainer whose logged step metrics stay readable (``trainer.logged_metrics``)."""

    def make(**kwargs) -> pl.Trainer:
        args = dict(
            accelerator="cpu", devices=1, max_epochs=1, limit_val_batches=0, logger=False, log_every_n_steps=1,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=tmp_path,
        )
        args.update(kwargs)
        return pl.Trainer(**args)

    return make
