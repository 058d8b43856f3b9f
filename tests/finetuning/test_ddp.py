"""2-process DDP on CPU: encoders frozen when DDP wraps the model (so DDP does not sync them) train in sync once
unfrozen, because StagedFinetuning all-reduces their gradients; without that, the ranks drift apart. A parameter that
gets no gradient stays untouched, and a plateau seen by one rank moves both to the next stage together. With the
activation cache each rank serves its own samples' lower-block activations and trains as without it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


@pytest.mark.parametrize("sync", [True, False], ids=["synchronised", "control-without-sync"])
def test_unfrozen_encoders_train_identically_on_both_ranks(run_ddp_ranks, tmp_path, sync):
    run_ddp_ranks(str(Path(__file__).with_name("ddp_staged.py")), str(tmp_path), "sync" if sync else "nosync")
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["stage"] == rank1["stage"] == 1
    assert rank0["unsynced"] == rank1["unsynced"]
    assert "encoders.image.stem.0.weight" in rank0["unsynced"] and "encoders.text.embed.weight" not in rank0["unsynced"]
    assert rank0["before"] == rank1["before"]
    unfrozen = ["encoders.image.stem.0.weight", "encoders.text.layers.2.0.weight", "encoders.text.layers.1.0.bias"]
    for name in unfrozen:
        assert rank0["after"][name] != rank0["before"][name], name  # it trained
    assert rank0["after"]["encoders.text.embed.weight"] == rank0["before"]["encoders.text.embed.weight"]
    if sync:
        assert rank0["after"] == rank1["after"]
    else:
        assert all(rank0["after"][name] != rank1["after"][name] for name in unfrozen)
        assert rank0["after"]["fusion.head.weight"] == rank1["after"]["fusion.head.weight"]  # DDP's own sync
    assert rank0["hits"]["text"]["misses"] > 0
    unused = ["encoders.image.unused.weight", "encoders.image.unused.bias"]
    assert all(rank["after"][n] == rank["before"][n] for rank in (rank0, rank1) for n in unused)  # no decay


def test_a_plateau_on_one_rank_moves_both_ranks(run_ddp_ranks, tmp_path):
    run_ddp_ranks(str(Path(__file__).with_name("ddp_staged.py")), str(tmp_path), "plateau")
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # Rank 1's metric stalls after epoch 0's validation; patience 1: stage 1 from epoch 2 on both ranks.
    assert rank0["boundaries"] == rank1["boundaries"]
    assert [(b["stage"], b["epoch"]) for b in rank0["boundaries"]] == [(0, 0), (1, 2)]
    assert rank0["after"] == rank1["after"]


def test_with_gradient_accumulation_the_gradients_are_averaged_once_per_optimizer_step(run_ddp_ranks, tmp_path):
    run_ddp_ranks(str(Path(__file__).with_name("ddp_staged.py")), str(tmp_path), "accumulate")
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    # 6 batches of 4 per rank and epoch, 2 per optimizer step: 3 steps per epoch, each synchronised once, after the
    # last micro-batch's backward (DDP's own no_sync() window), never after the first.
    assert rank0["sync_calls"] == rank1["sync_calls"] == [0, 1, 2, 3, 4, 5]
    assert rank0["after"]["encoders.image.stem.0.weight"] != rank0["before"]["encoders.image.stem.0.weight"]
    assert rank0["after"] == rank1["after"]


def test_with_the_activation_cache_both_ranks_train_as_without_it(run_ddp_ranks, tmp_path):
    script = str(Path(__file__).with_name("ddp_staged.py"))
    runs = {}
    for mode in ("activations", "activations-off"):
        (tmp_path / mode).mkdir()
        run_ddp_ranks(script, str(tmp_path / mode), mode)
        runs[mode] = [json.loads((tmp_path / mode / f"rank{r}.json").read_text()) for r in (0, 1)]
    (cached0, cached1), (plain0, plain1) = runs["activations"], runs["activations-off"]
    assert cached0["after"] == cached1["after"] and plain0["after"] == plain1["after"]  # the ranks agree, bit for bit
    # Each rank's share of the shuffled epoch changes, so a batch of epoch 2 mixes cached samples with new ones, whose
    # lower blocks run on that subset alone: the matrix products see other shapes, and the last bits may differ. The
    # biases of the convolutions before a BatchNorm are left out: BatchNorm cancels them, so their gradient is rounding
    # noise only, which AdamW scales up to steps of its learning rate.
    noise_only = {"encoders.image.stem.0.bias", "encoders.image.block.0.bias"}
    for name, values in plain0["after"].items():
        if name not in noise_only:
            torch.testing.assert_close(torch.tensor(cached0["after"][name]), torch.tensor(values), rtol=0, atol=1e-6,
                                       msg=name)
    assert cached0["after"]["encoders.text.layers.2.0.weight"] != cached0["before"]["encoders.text.layers.2.0.weight"]
    # Epochs 1 and 2, 24 training and 8 validation samples per rank each: epoch 1 fills the cache, epoch 2 is served
    # for the training samples this rank saw in epoch 1 and for all of its validation samples.
    for rank in (cached0, cached1):
        stats = rank["activation_hits"]["text"]
        assert stats["hits"] + stats["misses"] == 2 * (24 + 8) and 8 < stats["hits"] < 24 + 8
    assert plain0["activation_hits"] is None
