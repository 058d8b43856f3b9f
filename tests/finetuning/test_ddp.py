"""2-process DDP on CPU: encoders frozen when DDP wraps the model (so DDP does not sync them) train in sync once
unfrozen, because StagedFinetuning all-reduces their gradients; without that, the ranks drift apart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.mark.parametrize("sync", [True, False], ids=["synchronised", "control-without-sync"])
def test_unfrozen_encoders_train_identically_on_both_ranks(run_python_subprocess, tmp_path, sync):
    run_python_subprocess(str(Path(__file__).with_name("ddp_staged.py")), str(tmp_path), "1" if sync else "0")
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
