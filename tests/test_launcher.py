"""The launcher of the DDP tests (tests/launcher.py), on plain ``python -c`` processes, fresh or forked from the
preloaded interpreter: each process gets its rank's variables and none of the test process's own; a run fails when a
process exits with an error or a signal (the SIGABRT at exit of pytorch/pytorch#190489), or hangs, and the processes
left are killed. A forked process runs a script or a module as ``__main__`` and shuts down as a fresh one does."""

from __future__ import annotations

import json
import time

import pytest

import tests.launcher
from tests.launcher import lightning_environment, run_ranks, start_fresh

RANK = "import os, sys; rank = int(os.environ['LOCAL_RANK'])"


@pytest.fixture(params=["fresh", "preloaded"])
def start(request):
    return start_fresh if request.param == "fresh" else request.getfixturevalue("preloaded_python").start


def test_each_process_gets_its_ranks_variables_and_none_of_ours(tmp_path, monkeypatch, start):
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")  # what an earlier in-process seed_everything leaves
    monkeypatch.setenv("SLURM_PROCID", "3")
    code = "import json, os; print(json.dumps({'cwd': os.getcwd(), **{k: v for k, v in os.environ.items()}}))"
    ranks = run_ranks(["-c", code], tmp_path, lightning_environment(3), processes=3, start=start)
    seen = [json.loads(rank.stdout) for rank in ranks]
    assert [s["LOCAL_RANK"] for s in seen] == ["0", "1", "2"]
    assert {(s["MASTER_ADDR"], s["MASTER_PORT"], s["NODE_RANK"], s["WORLD_SIZE"]) for s in seen} == {
        ("127.0.0.1", seen[0]["MASTER_PORT"], "0", "3")
    }
    assert not any("PL_GLOBAL_SEED" in s or "SLURM_PROCID" in s for s in seen)
    assert all(s["OMP_NUM_THREADS"] == "1" and s["cwd"] == str(tmp_path) for s in seen)


def test_a_process_killed_by_a_signal_fails_the_run(tmp_path, start):
    code = f"{RANK}; print('fit done', flush=True); os.abort() if rank == 1 else None"
    with pytest.raises(AssertionError, match=r"failed: exit codes \[0, -6\]") as failure:
        run_ranks(["-c", code], tmp_path, lightning_environment(2), start=start)
    assert failure.value.args[0].count("fit done") == 2  # both processes' output


def test_a_failed_process_ends_the_others_and_the_results_come_back_unchecked(tmp_path, monkeypatch, start):
    monkeypatch.setattr(tests.launcher, "GRACE_S", 0.5)
    code = f"{RANK}; import time; time.sleep(60) if rank == 0 else sys.exit('rank 1 failed')"
    begin = time.monotonic()
    with pytest.raises(AssertionError, match=r"killed 0.5 s after another process failed: exit codes \[-9, 1\]"):
        run_ranks(["-c", code], tmp_path, lightning_environment(2), start=start)
    assert time.monotonic() - begin < 30
    code = f"{RANK}; sys.exit(rank + 2)"
    ranks = run_ranks(["-c", code], tmp_path, lightning_environment(2), check=False, start=start)
    assert [rank.returncode for rank in ranks] == [2, 3]


def test_a_hanging_run_is_killed_at_the_timeout_even_unchecked(tmp_path, start):
    code = "import time; time.sleep(60)"
    with pytest.raises(AssertionError, match=r"killed after 1 s: exit codes \[-9, -9\]"):
        run_ranks(["-c", code], tmp_path, lightning_environment(2), timeout=1.0, check=False, start=start)


def test_a_forked_process_runs_a_script_or_module_as_main_and_shuts_down_in_full(tmp_path, preloaded_python):
    """argv, sys.path[0] and ``__name__`` as ``python SCRIPT`` / ``python -m`` set them; an uncaught exception exits 1
    with its traceback; the atexit handlers run and a thread the script leaves running is joined at shutdown."""
    script = tmp_path / "script.py"
    script.write_text(
        "import atexit, json, sys, threading, time\n"
        "atexit.register(lambda: print('atexit ran', flush=True))\n"
        "threading.Thread(target=lambda: (time.sleep(0.5), print('thread joined', flush=True))).start()\n"
        "print(json.dumps({'name': __name__, 'argv': sys.argv, 'path0': sys.path[0]}), flush=True)\n"
        "if sys.argv[1] == 'raise':\n"
        "    raise ValueError('raised in the script')\n"
    )
    (tmp_path / "module_here.py").write_text("import sys; print(__name__, sys.argv[1:])\n")
    start = preloaded_python.start
    ok, failed = (run_ranks([str(script), mode], tmp_path, lightning_environment(1), 1, check=False, start=start)[0]
                  for mode in ("ok", "raise"))
    first, *rest = ok.stdout.splitlines()
    assert json.loads(first) == {"name": "__main__", "argv": [str(script), "ok"], "path0": str(tmp_path)}
    assert (ok.returncode, rest) == (0, ["thread joined", "atexit ran"])
    assert failed.returncode == 1 and "ValueError: raised in the script" in failed.stderr
    (module,) = run_ranks(["-m", "module_here", "x"], tmp_path, lightning_environment(1), 1, start=start)
    assert module.stdout == "__main__ ['x']\n"


def test_forked_processes_draw_their_own_random_numbers_and_know_their_rank(tmp_path, preloaded_python):
    """As fresh interpreters: torch's and numpy's global generators seeded from the OS, Lightning's rank_zero_only
    rank from the launcher's variables before any Trainer sets it."""
    code = ("import numpy, torch; from lightning.pytorch.utilities import rank_zero_only; "
            "print(torch.initial_seed(), numpy.random.randint(2**31), rank_zero_only.rank)")
    ranks = run_ranks(["-c", code], tmp_path, lightning_environment(2), start=preloaded_python.start)
    (torch0, numpy0, rank0), (torch1, numpy1, rank1) = (rank.stdout.split() for rank in ranks)
    assert torch0 != torch1 and numpy0 != numpy1 and (rank0, rank1) == ("0", "1")
