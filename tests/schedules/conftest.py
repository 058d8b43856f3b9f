from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest


@pytest.fixture
def make_trainer(tmp_path: Path):
    """A quiet CPU Trainer for schedule tests; keyword arguments override the defaults."""

    def make(**kwargs) -> pl.Trainer:
        args = dict(
            accelerator="cpu", devices=1, max_epochs=2, limit_train_batches=10, limit_val_batches=0, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=tmp_path,
        )
        args.update(kwargs)
        return pl.Trainer(**args)

    return make
