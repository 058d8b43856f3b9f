"""The files of an MVSA root that more than the MVSA data module reads: the label file's name, and tweet texts (which
the reader of inputs to predict on also reads from folders of ``<id>.txt``). Apart from ``mvsa.py`` so that reading
inputs to predict on, which every data module does, does not import the MVSA data module."""

from __future__ import annotations

from pathlib import Path

LABEL_FILE = "labelResultAll.txt"


def read_tweet(path: Path) -> str:
    """The stripped text of a tweet file: UTF-8, or Latin-1 where it is not UTF-8 (MVSA's files mix both)."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return text.strip()
