"""2-process DDP on CPU: identical parameters on both ranks after balanced steps (with GE noise), and first-step
coefficients equal to the single-process ones on the same global batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ml_optim_plugins.functional import ogm_ge_coefficients, true_class_scores
from tests.balancing.tiny import imbalanced_samples, tiny_classifier


def test_ranks_agree_and_match_the_global_batch(run_python_subprocess, tmp_path):
    run_python_subprocess(str(Path(__file__).with_name("ddp_balance.py")), str(tmp_path))
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["params"] == rank1["params"]
    assert rank0["first"] == rank1["first"]
    everything = imbalanced_samples()
    # The first batch of each rank (8 samples each, drawn by Lightning's distributed sampler), found by value.
    index = [next(i for i, s in enumerate(everything) if abs(s["a"][0].item() - v) < 1e-6)
             for rank in (rank0, rank1) for v in rank["a0"]]
    assert len(set(index)) == 16
    batch = {k: torch.stack([everything[i][k] for i in index]) for k in everything[0]}
    model = tiny_classifier()
    model.training_step(batch, 0)
    scores = true_class_scores(model.modality_logits, batch["label"])
    expected = ogm_ge_coefficients({k: v.item() for k, v in scores.items()}, 0.5)
    for modality in ("a", "b"):
        assert rank0["first"][modality]["score"] == pytest.approx(scores[modality].item(), rel=1e-5)
        assert rank0["first"][modality]["coefficient"] == pytest.approx(expected[modality], rel=1e-5)
