"""2-process DDP on CPU: every rank derives the same total and applies the same LRs at every step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ml_optim_plugins.schedules import WarmupDecaySchedule

SCRIPT = Path(__file__).with_name("ddp_lrs.py")


def test_every_rank_uses_the_same_learning_rates(run_ddp_ranks, tmp_path):
    run_ddp_ranks(str(SCRIPT), str(tmp_path))
    rank0, rank1 = (json.loads((tmp_path / f"lrs-rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1
    # 6 batches per rank per epoch (the sampler splits the data, the batch limit applies per rank) / 2 accumulated
    assert rank0["total"] == 6 and rank0["warmup"] == 2
    schedule = WarmupDecaySchedule(total_steps=6, warmup_steps=2, decay="cosine", min_lr_ratio=0.1)
    body = [lrs[0] for lrs in rank0["lrs"]]
    head = [lrs[1] for lrs in rank0["lrs"]]
    late = [lrs[2] for lrs in rank0["lrs"][3:]]
    assert body == pytest.approx([schedule.lr(k, 0.1) for k in range(6)])
    assert head == pytest.approx([schedule.lr(k, 0.05) for k in range(6)])
    assert late == pytest.approx([schedule.group_lr(k, 0.05, 3, 2) for k in range(3, 6)])
