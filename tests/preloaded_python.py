"""Run as ``python -m tests.preloaded_python`` (by tests/launcher.py): a Python process that imports the library (torch,
Lightning, torchmetrics, timm, transformers: ~12 s of CPU) once, then forks a child per request that runs what
``python ARGS`` would, so that a DDP test's processes start in a fraction of a second.

Each request is a line of JSON on stdin: ``{"args": [...], "cwd": ..., "env": {...}, "stdout": path, "stderr": path}``.
The reply, on stdout, is ``{"pid": PID}``; when a child ends, ``{"pid": PID, "code": CODE}`` follows, with the code
``subprocess`` would give (``-6`` for a SIGABRT). A child runs the script or module as ``__main__`` (``runpy``, as the
interpreter does) with ``sys.argv``, the working directory and the environment of the request, then ends as a fresh
interpreter does: its ``SystemExit`` (or exception) unwinds this module to the top and Python shuts down in full
(atexit handlers, module teardown, native threads still alive), so a process that aborts at exit fails here too.

A child redoes what the server's imports did with its own process in mind: it seeds torch's and numpy's global
generators from the OS (Python's ``random`` is reseeded at fork) and sets Lightning's ``rank_zero_only.rank`` from its
``RANK`` / ``LOCAL_RANK``. What remains different from a fresh interpreter: anything else the preloaded modules read
from the environment at import was read without the request's variables (the launchers' variables, which only those
two read here, and the test process's, the same for every request); a warning shown once at import is not shown
again; tracebacks show this module's frames."""

from __future__ import annotations

import json
import os
import runpy
import select
import sys

KEEP: list[dict] = []  # a script's globals live until the interpreter shuts down, as a fresh one's ``__main__`` does


def reply(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def run_child(request: dict) -> None:
    """In the forked child: become ``python ARGS`` (``-m MODULE``, ``-c CODE`` or ``SCRIPT``, then its arguments) in
    the request's directory and environment; never returns."""
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY | os.O_APPEND),
                            (2, request["stderr"], os.O_WRONLY | os.O_APPEND)):
        opened = os.open(path, flags)
        os.dup2(opened, fd)
        os.close(opened)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    # A fresh interpreter seeds torch's and numpy's global generators from the OS; a fork would share the server's state
    # (Python's random is reseeded at fork).
    import numpy
    import torch
    from lightning.fabric.utilities.rank_zero import _get_rank, rank_zero_only

    torch.seed()
    numpy.random.seed()
    rank_zero_only.rank = _get_rank() or 0  # what Lightning sets at import, from the request's RANK / LOCAL_RANK
    args = request["args"]
    if args[0] == "-m":  # python -m MODULE ARGS: the working directory first on sys.path
        sys.argv, sys.path[0] = [args[1], *args[2:]], os.getcwd()
        KEEP.append(runpy.run_module(args[1], run_name="__main__", alter_sys=True))
    elif args[0] == "-c":  # python -c CODE ARGS
        sys.argv, sys.path[0] = ["-c", *args[2:]], ""
        KEEP.append({"__name__": "__main__", "__builtins__": __builtins__})
        exec(compile(args[1], "<string>", "exec"), KEEP[-1])
    else:  # python SCRIPT ARGS: the script's directory first on sys.path
        sys.argv, sys.path[0] = list(args), os.path.dirname(os.path.abspath(args[0]))
        KEEP.append(runpy.run_path(args[0], run_name="__main__"))
    raise SystemExit(0)


def serve() -> None:
    import lightning.pytorch  # noqa: F401
    import ml_optim_plugins  # noqa: F401

    reply({"ready": True})
    received = b""
    while True:
        if select.select([0], [], [], 0.05)[0]:
            chunk = os.read(0, 1 << 16)
            if not chunk:  # the test session ended
                return
            *lines, received = (received + chunk).split(b"\n")
            for line in lines:
                pid = os.fork()
                if pid == 0:
                    run_child(json.loads(line))
                reply({"pid": pid})
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            reply({"pid": pid, "code": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    serve()
