"""The launcher of the DDP tests (tests/launcher.py), on plain ``python -c`` processes: each process gets its rank's
variables and none of the test process's own; a run fails when a process exits with an error or a signal (the SIGABRT
at exit of pytorch/pytorch#190489), or hangs, and the processes left are killed."""

from __future__ import annotations

import json
import time

import pytest

import tests.launcher
from tests.launcher import lightning_environment, run_ranks

RANK = "import os, sys; rank = int(os.environ['LOCAL_RANK'])"


def test_each_process_gets_its_ranks_variables_and_none_of_ours(tmp_path, monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")  # what an earlier in-process seed_everything leaves
    monkeypatch.setenv("SLURM_PROCID", "3")
    code = "import json, os; print(json.dumps({k: v for k, v in os.environ.items() if k.isupper()}))"
    ranks = run_ranks(["-c", code], tmp_path, lightning_environment(3), processes=3)
    seen = [json.loads(rank.stdout) for rank in ranks]
    assert [s["LOCAL_RANK"] for s in seen] == ["0", "1", "2"]
    assert {(s["MASTER_ADDR"], s["MASTER_PORT"], s["NODE_RANK"], s["WORLD_SIZE"]) for s in seen} == {
        ("127.0.0.1", seen[0]["MASTER_PORT"], "0", "3")
    }
    assert not any("PL_GLOBAL_SEED" in s or "SLURM_PROCID" in s for s in seen)
    assert all(s["OMP_NUM_THREADS"] == "1" for s in seen)


def test_a_process_killed_by_a_signal_fails_the_run(tmp_path):
    code = f"{RANK}; print('fit done', flush=True); os.abort() if rank == 1 else None"
    with pytest.raises(AssertionError, match=r"failed: exit codes \[0, -6\]") as failure:
        run_ranks(["-c", code], tmp_path, lightning_environment(2))
    assert failure.value.args[0].count("fit done") == 2  # both processes' output


def test_a_failed_process_ends_the_others_and_the_results_come_back_unchecked(tmp_path, monkeypatch):
    monkeypatch.setattr(tests.launcher, "GRACE_S", 0.5)
    code = f"{RANK}; import time; time.sleep(60) if rank == 0 else sys.exit('rank 1 failed')"
    start = time.monotonic()
    with pytest.raises(AssertionError, match=r"killed 0.5 s after another process failed: exit codes \[-9, 1\]"):
        run_ranks(["-c", code], tmp_path, lightning_environment(2))
    assert time.monotonic() - start < 30
    code = f"{RANK}; sys.exit(rank + 2)"
    assert [r.returncode for r in run_ranks(["-c", code], tmp_path, lightning_environment(2), check=False)] == [2, 3]


def test_a_hanging_run_is_killed_at_the_timeout_even_unchecked(tmp_path):
    code = f"{RANK}; import time; time.sleep(0 if rank == 0 else 60)"
    with pytest.raises(AssertionError, match=r"killed after 1 s: exit codes \[0, -9\]"):
        run_ranks(["-c", code], tmp_path, lightning_environment(2), timeout=1.0, check=False)
