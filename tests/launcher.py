"""Starting the processes of a distributed run together, as torchrun or a cluster launcher does: each gets the variables
that say where it is (``LOCAL_RANK`` among them), so Lightning starts none itself.

Lightning's own launcher starts the others only when the first reaches ``fit``, so a test that lets it launch pays for
importing the library twice in a row; started together, the processes import at the same time. Started by
:class:`PreloadedPython` (forked from an interpreter that imported the library once), they import nothing."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

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
    """A TCP port free on 127.0.0.1 now, for the main process of a process group (as Lightning's launcher picks one)."""
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


class Process(Protocol):
    """What :func:`run_ranks` uses of a started process (``subprocess.Popen`` has it)."""

    args: Sequence[str]
    returncode: int | None

    def poll(self) -> int | None: ...

    def kill(self) -> None: ...

    def wait(self) -> int: ...


# Starts ``python ARGS`` in a directory with an environment, its output appended to two files.
Start = Callable[[Sequence[str], Path, Mapping[str, str], Path, Path], Process]


def start_fresh(args: Sequence[str], cwd: Path, env: Mapping[str, str], stdout: Path, stderr: Path) -> Process:
    """A fresh interpreter: ``python ARGS`` as a subprocess."""
    with stdout.open("a") as out, stderr.open("a") as err:
        return subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=out, stderr=err)


class ForkedProcess:
    """A child of a :class:`PreloadedPython`, with the part of ``subprocess.Popen`` that :func:`run_ranks` uses."""

    def __init__(self, python: PreloadedPython, pid: int, args: Sequence[str]) -> None:
        self.python, self.pid, self.args = python, pid, list(args)

    @property
    def returncode(self) -> int | None:
        return self.python.codes.get(self.pid)

    def poll(self) -> int | None:
        self.python.read_messages()
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)

    def wait(self) -> int:
        while self.poll() is None:
            time.sleep(0.02)
        return self.returncode


class PreloadedPython:
    """tests/preloaded_python.py started (``python -m tests.preloaded_python``): it imports the library once, then
    :meth:`start` forks it into ``python ARGS`` (a :data:`Start`) and it reports each child's exit code.

    What a forked child does not share with a fresh interpreter is listed in tests/preloaded_python.py."""

    def __init__(self, timeout: float = 600.0) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "tests.preloaded_python"], cwd=REPO,
                                        env=subprocess_environment(), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.codes: dict[int, int] = {}
        self.pending: list[dict] = []
        self.buffer = b""
        self.until(lambda message: message.get("ready"), timeout)

    def read_messages(self, wait: float = 0.0) -> None:
        """Read what the server wrote (waiting up to ``wait`` seconds for it): exit codes go to ``codes``."""
        if self.process.poll() is not None:
            raise RuntimeError(f"tests/preloaded_python.py ended with exit code {self.process.returncode}")
        fd = self.process.stdout.fileno()
        while select.select([fd], [], [], wait)[0]:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            self.buffer += chunk
            wait = 0.0
        *lines, self.buffer = self.buffer.split(b"\n")
        for message in map(json.loads, lines):
            if "code" in message:
                self.codes[message["pid"]] = message["code"]
            else:
                self.pending.append(message)

    def until(self, wanted: Callable[[dict], bool], timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while not any(map(wanted, self.pending)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"tests/preloaded_python.py did not answer in {timeout:g} s")
            self.read_messages(wait=0.1)
        message = next(m for m in self.pending if wanted(m))
        self.pending.remove(message)
        return message

    def start(self, args: Sequence[str], cwd: Path, env: Mapping[str, str], stdout: Path, stderr: Path) -> Process:
        request = {"args": list(args), "cwd": str(cwd), "env": dict(env), "stdout": str(stdout), "stderr": str(stderr)}
        self.process.stdin.write(json.dumps(request).encode() + b"\n")
        self.process.stdin.flush()
        return ForkedProcess(self, self.until(lambda message: "pid" in message, 60.0)["pid"], args)

    def close(self) -> None:
        """End the server (it exits when its input closes)."""
        self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def run_ranks(
    args: Sequence[str],
    cwd: Path,
    environment: Callable[[int, int], Mapping[str, str]],
    processes: int = 2,
    timeout: float = 300.0,
    check: bool = True,
    start: Start = start_fresh,
) -> list[subprocess.CompletedProcess]:
    """Start ``python ARGS`` in ``cwd`` as every process of a distributed run at once and wait for them; their results,
    by rank.

    Process ``rank`` runs with ``environment(rank, port)`` on top of :func:`subprocess_environment`, ``port`` a free
    one for the main process, started by ``start`` (a fresh interpreter, or :meth:`PreloadedPython.start`). A process
    still running after ``timeout`` seconds fails the test, and with ``check`` so does one that exits with another
    code than 0, a signal included (the SIGABRT at exit of pytorch/pytorch#190489 is -6), once the others had
    ``GRACE_S`` to end on their own. Those left are killed; the message holds every process's exit code and the end of
    its output. Without ``check`` the results come back whatever the codes.
    """
    port, base = free_port(), subprocess_environment()
    with tempfile.TemporaryDirectory(prefix="ranks-") as logs:
        # Files, not pipes: a pipe nobody reads while waiting would fill and block the process.
        outputs = [(Path(logs) / f"{rank}.out", Path(logs) / f"{rank}.err") for rank in range(processes)]
        for out, err in outputs:
            out.touch(), err.touch()
        started = [start(args, cwd, {**base, **environment(rank, port)}, out, err)
                   for rank, (out, err) in enumerate(outputs)]
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
                process.kill()
                process.wait()
        results = [
            subprocess.CompletedProcess(process.args, process.returncode, out.read_text(errors="replace"),
                                        err.read_text(errors="replace"))
            for process, (out, err) in zip(started, outputs)
        ]
    codes = [result.returncode for result in results]
    report = "\n".join(
        f"rank {rank} exit {result.returncode}\nSTDOUT:\n{result.stdout[-4000:]}\nSTDERR:\n{result.stderr[-5000:]}"
        for rank, result in enumerate(results)
    )
    assert not killed and (not check or set(codes) == {0}), f"{killed or 'failed'}: exit codes {codes}\n{report}"
    return results
