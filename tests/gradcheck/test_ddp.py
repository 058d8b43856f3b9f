"""2-process DDP on CPU: the checks run on rank 0 only, every rank gets the verdict, a failure stops every rank."""

from __future__ import annotations

import json
from pathlib import Path

SCRIPT = Path(__file__).with_name("ddp_checks.py")


def test_rank_zero_checks_and_shared_verdicts(run_ddp_ranks, tmp_path):
    run_ddp_ranks(str(SCRIPT), str(tmp_path), "none")
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["ran_check"] and not rank1["ran_check"]
    assert rank0["checked_epochs"] == rank1["checked_epochs"] == [0]
    assert rank0["overfit_passed"] is rank1["overfit_passed"] is True
    assert rank0["overfit_losses"] == rank1["overfit_losses"]
    assert rank0["weights"] == rank1["weights"]
    assert rank0["curves"] and Path(rank0["curves"]).is_file() and rank1["curves"] is None
    assert len(list(tmp_path.rglob("gradcheck-epoch0.json"))) == 1


def test_a_failed_check_stops_every_rank(run_ddp_ranks, tmp_path):
    ranks = run_ddp_ranks(str(SCRIPT), str(tmp_path), "sign", check=False)  # a rank still running fails the test
    for rank in ranks:
        assert rank.returncode != 0
        assert "gradient check failed at epoch 0" in rank.stderr
    assert not list(tmp_path.glob("rank*.json"))
