"""MultimodalDataModule under a distributed Trainer: the val / test loaders give each rank its share of the split,
every sample exactly once (no padding), and a split smaller than the process count is refused with a clear error;
the training loader shares each epoch out from one seed."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

from ml_optim_plugins import SyntheticSentimentDataModule


def attached(trainer: pl.Trainer, **sizes) -> SyntheticSentimentDataModule:
    data = SyntheticSentimentDataModule(**{"train_size": 8, "val_size": 7, "test_size": 5, **sizes}, image_size=16)
    data.trainer = trainer  # what Trainer.fit / test do before asking for the loaders
    data.setup("fit")
    return data


@pytest.mark.parametrize("split", ["val", "test"])
def test_each_sample_is_evaluated_once_across_the_ranks(split):
    trainer = pl.Trainer(accelerator="cpu", devices=3, strategy="ddp", logger=False)
    data = attached(trainer)
    shares = []
    for rank in range(3):
        trainer.strategy.cluster_environment.set_global_rank(rank)
        loader = data.val_dataloader() if split == "val" else data.test_dataloader()
        assert isinstance(loader.sampler, UnrepeatedDistributedSampler)
        shares.append([int(i) for batch in loader for i in batch["index"]])
    size = len(data.datasets[split])
    assert sorted(i for share in shares for i in share) == list(range(size))
    assert [len(share) for share in shares] == [len(range(rank, size, 3)) for rank in range(3)]


def test_one_process_keeps_the_plain_loader():
    data = attached(pl.Trainer(accelerator="cpu", devices=1, logger=False))
    assert data.evaluation_sampler("val") is None
    assert [int(i) for batch in data.val_dataloader() for i in batch["index"]] == list(range(7))


def test_a_split_smaller_than_the_process_count_is_refused():
    data = attached(pl.Trainer(accelerator="cpu", devices=3, strategy="ddp", logger=False), val_size=2)
    with pytest.raises(ValueError, match=r"the val split has 2 sample\(s\) for 3 processes; .*at least 3 samples"):
        data.val_dataloader()


def test_unseeded_ranks_share_each_training_epoch_without_overlap(run_ddp_ranks, tmp_path):
    """Without seed_everything each process starts with its own random torch seed; the training order still comes
    from one seed (rank 0's), so the two ranks' shares of each epoch are disjoint and cover the split."""
    run_ddp_ranks(str(Path(__file__).with_name("ddp_shuffle.py")), str(tmp_path))
    rank0, rank1 = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert rank0["seed"] != rank1["seed"]  # the case under test: the processes' own seeds differ
    for epoch in ("0", "1"):
        assert sorted(rank0["seen"][epoch] + rank1["seen"][epoch]) == list(range(12)), epoch
    assert rank0["seen"]["0"] != rank0["seen"]["1"]  # a new order each epoch
