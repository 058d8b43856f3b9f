"""Starting the processes of a distributed run together, as torchrun or a cluster launcher does: each gets the variables
that say where it is (``LOCAL_RANK`` among them), so Lightning starts none itself.

Lightning's own launcher starts the others only when the first reaches ``fit``, so a test that lets it launch pays for
importing the library twice in a row; started together, the processes import at the same time."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# For test subprocesses: this checkout's src/ first (an editable install may point at another checkout, a git
# worktree's main one), then the repository root for ``tests.*`` helpers.
SUBPROCESS_PYTHONPATH = os.pathsep.join([str(REPO / "src"), str(REPO)])
# Variables a cluster launcher sets for each process it starts (Lightning's, torchrun's, srun's), and the seed that
# Lightning's seed_everything exports: none of the test process's own may reach the processes a test starts.
CLUSTER_VARIABLES = (
    "MASTER_", "NODE_RANK", "LOCAL_", "WORLD_SIZE", "RANK", "GROUP_", "TORCHELASTIC_", "SLURM_", "PL_GLOBAL_SEED",
)
GRACE_S = 10.0  # how long the other processes may take to end on their own after one failed


def subprocess_environment() -> dict[str, str]:
    """This process's environment for a test's Python subprocess: this checkout first, one OpenMP thread, none of the
    launchers' variables (``CLUSTER_VARIABLES``), unbuffered output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(CLUSTER_VARIABLES)}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=SUBPROCESS_PYTHONPATH)
    return env


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for the main process of a process group (Lightning's launcher does the same)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def lightning_environment(processes: int) -> Callable[[int, int], dict[str, str]]:
    """The variables Lightning's own launcher (``_SubprocessScriptLauncher``) gives process ``rank`` of ``processes``
    on one node, as a function of ``(rank, port)``; Lightning's ``LightningEnvironment`` reads them."""

    def environment(rank: int, port: int) -> dict[str, str]:
        return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": "0", "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(processes)}

    return environment


def run_ranks(
    args: Sequence[str],
    cwd: Path,
    environment: Callable[[int, int], Mapping[str, str]],
    processes: int = 2,
    timeout: float = 300.0,
    check: bool = True,
) -> list[subprocess.CompletedProcess]:
    """Start ``python ARGS`` in ``cwd`` as every process of a distributed run at once and wait for them; their results,
    by rank.

    Process ``rank`` runs with ``environment(rank, port)`` on top of :func:`subprocess_environment`, ``port`` a free
    one for the main process. A process still running after ``timeout`` seconds fails the test, and with ``check`` so
    does one that exits with another code than 0, a signal included (the SIGABRT at exit of pytorch/pytorch#190489 is
    -6), once the others had ``GRACE_S`` to end on their own. Those left are killed; the message holds every process's
    exit code and the end of its output. Without ``check`` the results come back whatever the codes.
    """
    port, base = free_port(), subprocess_environment()
    # Files, not pipes: a pipe nobody reads while waiting would fill and block the process.
    outputs = [(tempfile.TemporaryFile("w+", errors="replace"), tempfile.TemporaryFile("w+", errors="replace"))
               for _ in range(processes)]
    started = [
        subprocess.Popen([sys.executable, *args], cwd=cwd, env={**base, **environment(rank, port)}, stdout=out,
                         stderr=err)
        for rank, (out, err) in enumerate(outputs)
    ]
    deadline, failed_at, killed = time.monotonic() + timeout, None, ""
    try:
        while None in (codes := [process.poll() for process in started]):
            now = time.monotonic()
            if failed_at is None and check and any(code not in (None, 0) for code in codes):
                failed_at = now
            if now > deadline:
                killed = f"killed after {timeout:g} s"
            elif failed_at is not None and now > failed_at + GRACE_S:
                killed = f"killed {GRACE_S:g} s after another process failed"
            if killed:
                break
            time.sleep(0.1)
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
            process.wait()
    results = []
    for process, (out, err) in zip(started, outputs):
        out.seek(0), err.seek(0)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, out.read(), err.read()))
        out.close(), err.close()
    codes = [result.returncode for result in results]
    report = "\n".join(
        f"rank {rank} exit {result.returncode}\nSTDOUT:\n{result.stdout[-4000:]}\nSTDERR:\n{result.stderr[-5000:]}"
        for rank, result in enumerate(results)
    )
    assert not killed and (not check or set(codes) == {0}), f"{killed or 'failed'}: exit codes {codes}\n{report}"
    return results
