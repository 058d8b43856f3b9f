"""Errors a person can read at the terminal: the library's own message, not jsonargparse's wrapping of it.

A ``ValueError`` raised by one of our constructors while LightningCLI builds the classes reaches the terminal as the
cause of jsonargparse's "Does not validate against any of the Union subtypes", about 90 lines in all. The console
entry point prints it as one line instead; ``JSONARGPARSE_DEBUG=true`` (jsonargparse's own switch, which also makes
it log what it parses) restores the full traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from lightning.pytorch.utilities.exceptions import MisconfigurationException

Entry = TypeVar("Entry", bound=Callable[..., object])

DEBUG_VARIABLE = "JSONARGPARSE_DEBUG"
# What the library raises on purpose, with a message written for the user; other types (AttributeError, ...) are bugs
# and keep their traceback.
MESSAGE_ERRORS = (ValueError, TypeError, KeyError, OSError, RuntimeError, ArithmeticError, MisconfigurationException)
_PACKAGE = Path(__file__).resolve().parent
# The console entry and the recipe CLI it runs: their frames are the way in, not where an error comes from.
_ENTRY_FILES = {_PACKAGE / "cli.py", _PACKAGE / "recipe_cli.py", Path(__file__).resolve()}


def _frames(traceback: TracebackType | None) -> list[tuple[Path, str]]:
    """``(file, function)`` of each frame, outermost first; a method is named by the class of its ``self`` (the
    ``ConcatFusion`` the user configured, not the base class that holds ``__init__``)."""
    frames = []
    while traceback is not None:
        code = traceback.tb_frame.f_code
        owner = traceback.tb_frame.f_locals.get("self")
        name = f"{type(owner).__name__}.{code.co_name}" if owner is not None else code.co_name
        frames.append((Path(code.co_filename).resolve(), name))
        traceback = traceback.tb_next
    return frames


def _in_package(path: Path) -> bool:
    return path == _PACKAGE or _PACKAGE in path.parents


def _raised_in_package(error: BaseException) -> bool:
    """Whether the innermost frame of ``error``'s traceback (where it was raised) is in the package."""
    frames = _frames(error.__traceback__)
    return bool(frames) and _in_package(frames[-1][0])


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and the exceptions behind it (``__cause__``, else an unsuppressed ``__context__``), outermost first."""
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return chain


def short_error(error: BaseException) -> str | None:
    """One line for the terminal: ``"{Type} in {where}: {message}"`` of the library's own error behind ``error`` (or
    Lightning's ``MisconfigurationException``, or, under a jsonargparse wrapper, the error it wraps), or ``None`` when
    ``error`` is something else (a bug keeps its traceback).

    ``where`` is the first library function on the way to the raise (``MultimodalClassifier.__init__``,
    ``WarmupDecay.on_fit_start``), skipping the command-line entry itself.

    Example:
        >>> from ml_optim_plugins import ModalityBalancer
        >>> try:
        ...     ModalityBalancer(alpha=float("nan"))
        ... except ValueError as err:
        ...     print(short_error(err))
        ValueError in ModalityBalancer.__init__: alpha must be a finite number >= 0, got nan
    """
    chain = _chain(error)
    # Raised by the library on purpose, or Lightning's own configuration errors (written for the user too).
    ours = [e for e in chain if isinstance(e, MESSAGE_ERRORS) and _raised_in_package(e)
            or isinstance(e, MisconfigurationException)]
    if ours:
        found = ours[-1]
    else:
        frames = _frames(error.__traceback__)
        wrapped = len(chain) > 1 and frames and "jsonargparse" in frames[-1][0].parts
        if not wrapped or not isinstance(chain[-1], MESSAGE_ERRORS):
            return None
        found = chain[-1]
    frames = [(path, name) for path, name in _frames(found.__traceback__) if _in_package(path)]
    inner = [name for path, name in frames if path not in _ENTRY_FILES] or [name for _, name in frames[-1:]]
    where = f" in {inner[0]}" if inner else ""
    return f"{type(found).__name__}{where}: {found}"


def debug_requested() -> bool:
    """Whether ``JSONARGPARSE_DEBUG`` asks for full tracebacks."""
    return os.environ.get(DEBUG_VARIABLE, "").lower() == "true"


def exit_with_short_errors(entry: Entry) -> Entry:
    """Wrap a console entry point: an error :func:`short_error` recognises is printed to stderr as one line, with the
    way to get the traceback, and the process exits with status 1 (as an uncaught exception would); anything else,
    or everything under ``JSONARGPARSE_DEBUG=true``, propagates unchanged."""

    @functools.wraps(entry)
    def run(*args, **kwargs):
        try:
            return entry(*args, **kwargs)
        except Exception as error:
            message = None if debug_requested() else short_error(error)
            if message is None:
                raise
            print(f"ml-optim-plugins: error: {message}\n(full traceback: {DEBUG_VARIABLE}=true)", file=sys.stderr)
            raise SystemExit(1) from None

    return run  # type: ignore[return-value]
