"""2-process DDP on CPU: after a balanced step both ranks hold identical parameters and statistics (the GE noise
included), equal to one process's on the same global batch."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from ml_optim_plugins import ModalityBalancer
from tests.balancing.tiny import imbalanced_samples, tiny_classifier


@pytest.mark.parametrize("method", ["ogm_ge", "mmpareto"])
def test_ranks_agree_and_match_one_process_on_the_global_batch(run_ddp_ranks, tmp_path, method):
    run_ddp_ranks(str(Path(__file__).with_name("ddp_balance.py")), str(tmp_path), method, "1")
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["params"] == rank1["params"]
    assert rank0["first"] == rank1["first"]
    everything = imbalanced_samples()
    # The first batch of each rank (8 samples each, drawn by Lightning's distributed sampler), found by value.
    index = [next(i for i, s in enumerate(everything) if abs(s["a"][0].item() - v) < 1e-6)
             for rank in (rank0, rank1) for v in rank["a0"]]
    assert len(set(index)) == 16
    model = tiny_classifier(aux_loss_weight=1.0 if method == "mmpareto" else 0.0)
    balancer = ModalityBalancer(method, alpha=0.5, parameters="all")  # as ddp_balance.py
    pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[balancer]).fit(
        model, torch.utils.data.DataLoader([everything[i] for i in index], batch_size=16))
    for p, q in zip(model.parameters(), rank0["params"]):
        assert torch.allclose(p.detach().flatten(), torch.tensor(q), atol=1e-5)
    assert set(rank0["first"]) == set(balancer.last) == {"a", "b"}
    for modality, stats in balancer.last.items():
        assert rank0["first"][modality] == pytest.approx(stats, rel=1e-5, abs=1e-7)
