"""MultimodalClassifier under 2-process DDP on CPU (gloo): every logged metric, losses included, and the final weights
equal a one-process run on the same global batches (no dropout, BatchNorm statistics frozen; validation and test
splits of odd size, so padded duplicates or a mean of rank means would show); each rank draws its own dropout noise,
and a rerun draws the same."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

SCRIPT = str(Path(__file__).with_name("ddp_evaluation.py"))


def run(run_ddp_ranks, out: Path, mode: str, processes: int) -> list[dict]:
    out.mkdir()
    run_ddp_ranks(SCRIPT, str(out), mode, str(processes), processes=processes)
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(processes)]


def test_two_processes_log_the_metrics_and_reach_the_weights_of_one(run_ddp_ranks, tmp_path):
    (one,) = run(run_ddp_ranks, tmp_path / "one", "metrics", 1)
    rank0, rank1 = run(run_ddp_ranks, tmp_path / "two", "metrics", 2)
    for key in ("validations", "after_fit", "test", "weights"):
        assert rank0[key] == rank1[key], key  # synchronised: every rank holds the same values
    assert len(one["validations"]) == len(rank0["validations"]) == 2
    logged = ["val/loss", "val/acc", "val/f1", "val/f1_weighted", "val/image/loss", "val/text/acc", "train/loss"]
    assert set(logged) <= set(one["after_fit"])
    assert set(one["test"]) == {k.replace("val/", "test/") for k in one["after_fit"] if k.startswith("val/")}
    for epoch_one, epoch_two in zip(one["validations"], rank0["validations"]):
        assert epoch_two.keys() == epoch_one.keys()
        assert epoch_two == pytest.approx(epoch_one, rel=1e-5, abs=1e-6)
    assert rank0["after_fit"] == pytest.approx(one["after_fit"], rel=1e-5, abs=1e-6)
    assert rank0["test"] == pytest.approx(one["test"], rel=1e-5, abs=1e-6)
    assert rank0["weights"].keys() == one["weights"].keys()
    for name, values in one["weights"].items():
        torch.testing.assert_close(torch.tensor(rank0["weights"][name]), torch.tensor(values), rtol=1e-5, atol=1e-6)


def test_each_rank_draws_its_own_noise_and_a_rerun_draws_the_same(run_ddp_ranks, tmp_path):
    first = run(run_ddp_ranks, tmp_path / "first", "noise", 2)
    again = run(run_ddp_ranks, tmp_path / "again", "noise", 2)
    assert [rank["noise"] for rank in first] == [rank["noise"] for rank in again]
    rank0, rank1 = (rank["noise"] for rank in first)
    assert set(rank0) == {"gaussian", "modality", "text"}
    # Gaussian dropout: continuous factors, so no position where both ranks' inputs were kept draws the same one.
    both = [(a, b) for a, b in zip(rank0["gaussian"], rank1["gaussian"]) if a != 0 and b != 0]
    assert both and all(a != b for a, b in both)
    assert rank0["text"] != rank1["text"]  # the text encoder's dropout mask
    assert rank0["modality"] != rank1["modality"]  # which sample keeps which modality
