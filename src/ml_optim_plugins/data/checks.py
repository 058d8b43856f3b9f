"""Checks a data set passes before training: every image decodes, labels are spelt one way, duplicates are known.

A JPEG missing its tail passes PIL's ``verify()`` (which reads headers only) and fails when a worker decodes it at
step 8 000, under DDP as another rank's "Connection closed by peer". So images are decoded in full, in parallel threads
(Pillow releases the GIL while decoding), and each verdict is remembered in a small JSON cache keyed by path, size and
modification time, so the next run checks only new or changed files.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, UnidentifiedImageError

def default_check_cache() -> Path:
    """Where image verdicts are remembered: ``image-checks.json`` in ``$ML_OPTIM_PLUGINS_CACHE``, else in
    ``$XDG_CACHE_HOME/ml_optim_plugins`` (``~/.cache/ml_optim_plugins``)."""
    folder = os.environ.get("ML_OPTIM_PLUGINS_CACHE")
    if not folder:
        folder = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ml_optim_plugins")
    return Path(folder) / "image-checks.json"


def image_problem(path: Path) -> str | None:
    """Why the image at ``path`` cannot be used (missing, not an image, truncated or corrupt), or ``None``.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> Image.effect_noise((256, 256), 64).convert("RGB").save(folder / "ok.jpg")
        >>> data = (folder / "ok.jpg").read_bytes()
        >>> _ = (folder / "cut.jpg").write_bytes(data[: len(data) // 2])  # passes PIL's verify()
        >>> image_problem(folder / "ok.jpg") is None, "truncated" in image_problem(folder / "cut.jpg")
        (True, True)
    """
    if not path.is_file():
        return f"image {str(path)!r} not found"
    try:
        with Image.open(path) as image:
            image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        return f"image {str(path)!r} is unreadable ({err})"
    return None


def _key(path: Path) -> str | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def check_images(paths: Iterable[Path], cache_file: Path | None = None, workers: int | None = None) -> dict[Path, str]:
    """Decode every image of ``paths`` in full (in parallel threads) and return the problem of each bad one.

    Args:
        paths: image files.
        cache_file: a JSON file of verdicts from earlier checks (read, then rewritten atomically); ``None``: none.
        workers: decoding threads (default: the number of CPUs, at most 8).

    Returns:
        ``{path: problem}`` for the images that cannot be used; good images are absent.
    """
    unique = list(dict.fromkeys(Path(p) for p in paths))
    cache: dict[str, str] = {}
    if cache_file is not None and cache_file.is_file():
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cache = {}  # a damaged cache only costs a full check
    keys = {path: _key(path) for path in unique}
    todo = [path for path in unique if keys[path] is None or keys[path] not in cache]
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        fresh = dict(zip(todo, pool.map(image_problem, todo)))
    for path, problem in fresh.items():
        if keys[path] is not None:
            cache[keys[path]] = problem or ""
    if cache_file is not None and fresh:
        _write_atomically(cache_file, cache)
    problems = {}
    for path in unique:
        problem = fresh[path] if path in fresh else cache.get(keys[path] or "", "")
        if problem:
            problems[path] = problem
    return problems


def _write_atomically(path: Path, content: Mapping[str, str]) -> None:
    """Write JSON through a temporary file and a rename, so concurrent processes (DDP ranks) never read half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name)
        with os.fdopen(handle, "w") as out:
            json.dump(content, out)
        os.replace(temporary, path)
    except OSError:
        pass  # a read-only cache location only costs the next run a full check


def label_key(label: str) -> str:
    """The spelling-free form of a label: case-folded, and numbers written once (``"1.0"`` and ``"1"`` are ``"1"``).

    Example:
        >>> label_key(" Positive"), label_key("1.0"), label_key("-2")
        ('positive', '1', '-2')
    """
    text = label.strip().casefold()
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() else repr(number)


def label_spelling_conflicts(labels: Sequence[tuple[str, str, int]]) -> list[str]:
    """Labels spelt more than one way (``Positive`` / ``positive``, ``1`` / ``1.0``), which would become different
    classes; one message per class, naming each spelling with its first file and line.

    Args:
        labels: ``(label, file, line)`` per row.

    Example:
        >>> label_spelling_conflicts([("positive", "m.csv", 2), ("Positive", "m.csv", 7), ("1", "m.csv", 3)])
        ["'positive' (m.csv, line 2) and 'Positive' (m.csv, line 7) are one label spelt 2 ways"]
    """
    first: dict[str, dict[str, tuple[str, int]]] = defaultdict(dict)
    for label, file, line in labels:
        if label:
            first[label_key(label)].setdefault(label, (file, line))
    messages = []
    for spellings in first.values():
        if len(spellings) > 1:
            shown = " and ".join(f"{label!r} ({file}, line {line})" for label, (file, line) in spellings.items())
            messages.append(f"{shown} are one label spelt {len(spellings)} ways")
    return messages


def duplicate_groups(keys: Sequence[object]) -> list[list[int]]:
    """Positions of equal ``keys``, grouped, in order of first appearance (a key seen once is a group of one).

    Example:
        >>> duplicate_groups(["a", "b", "a", "c", "b"])
        [[0, 2], [1, 4], [3]]
    """
    groups: dict[object, list[int]] = {}
    for position, key in enumerate(keys):
        groups.setdefault(key, []).append(position)
    return list(groups.values())
