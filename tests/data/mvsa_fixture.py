"""Tiny MVSA-Single / MVSA-Multiple roots for tests: small JPEGs, short tweets, label lines of every cleaning case."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ml_optim_plugins.data.manifest import seeded_split
from ml_optim_plugins.data.mvsa import MVSA_LABELS

# The image cue: a colour per sentiment (warm, grey, cold), under pixel noise.
COLOURS = {"negative": (40, 60, 170), "neutral": (128, 128, 128), "positive": (235, 180, 40)}
WORDS = {
    "negative": ("awful", "terrible", "sad", "horrible"),
    "neutral": ("ordinary", "average", "plain", "typical"),
    "positive": ("lovely", "great", "happy", "wonderful"),
}
SUBJECTS = ("the weather", "this game", "our trip", "the concert", "my lunch", "the view")
_OTHER = {"negative": "positive", "positive": "negative", "neutral": "positive"}


def write_mvsa_samples(root: Path, samples: Sequence[Sequence[tuple[str, str]]], seed: int = 0) -> Path:
    """Write an MVSA root with one sample per entry of ``samples`` (IDs 1, 2, ...), each its ``(text, image)``
    label pairs per annotator (one pair: MVSA-Single, three: MVSA-Multiple).

    The image's colour and the tweet's sentiment word follow the most frequent image and text label. Every
    fourth tweet is written in Latin-1 (it says "café"), the others in UTF-8, as in the published data.
    """
    rng = np.random.default_rng(seed)
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    annotators = len(samples[0])
    lines = ["\t".join(["ID", *["text,image"] * annotators])]
    for number, pairs in enumerate(samples, start=1):
        text_label, image_label = (Counter(labels).most_common(1)[0][0] for labels in zip(*pairs))
        noise = rng.normal(0, 25, (24, 24, 3))
        pixels = np.clip(np.array(COLOURS[image_label]) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(data / f"{number}.jpg", quality=90)
        word = WORDS[text_label][rng.integers(len(WORDS[text_label]))]
        subject = SUBJECTS[rng.integers(len(SUBJECTS))]
        if number % 4 == 3:
            (data / f"{number}.txt").write_bytes(f"{subject} at the café was {word}\n".encode("latin-1"))
        else:
            (data / f"{number}.txt").write_text(f"RT @user{number}: {subject} was {word} #mvsa\n", encoding="utf-8")
        lines.append("\t".join([str(number), *(f"{text},{image}" for text, image in pairs)]))
    (root / "labelResultAll.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def _votes(majority: str, rng: np.random.Generator) -> list[str]:
    """Three annotators' labels for one modality, at least two of them ``majority``."""
    third = majority if rng.random() < 0.5 else MVSA_LABELS[rng.integers(3)]
    return [str(label) for label in rng.permutation([majority, majority, third])]


def write_mvsa(root: Path, n: int = 40, variant: str = "single", seed: int = 0) -> Path:
    """Write a valid MVSA-Single (``variant="single"``) or MVSA-Multiple root of ``n`` samples under ``root``.

    Every tenth sample is a positive / negative conflict; for Multiple also every tenth (another one) has no majority
    among the text labels. The others are kept and mix every way to a label: agreeing labels, a neutral beside a
    polar label, and for Multiple 2-of-3 and 3-of-3 majorities. Their labels are laid out over the data module's
    default split (``val_fraction=test_fraction=0.1``, ``split_seed=0``, see ``seeded_split``) so that train, val
    and test each hold all three classes. ``seed`` draws the pixel noise, the words and the annotators' votes.
    """
    if variant not in ("single", "multiple"):
        raise ValueError(f"variant={variant!r}; expected 'single' or 'multiple'")
    rng = np.random.default_rng(seed)
    kinds = ["conflict" if i % 10 == 9 else "no_majority" if variant == "multiple" and i % 10 == 4 else "kept"
             for i in range(n)]
    kept = [i for i, kind in enumerate(kinds) if kind == "kept"]
    label_of = {}
    for positions in seeded_split(len(kept), 0.1, 0.1, seed=0).values():
        for j, position in enumerate(positions):
            label_of[kept[position]] = MVSA_LABELS[j % 3]
    samples = []
    for i, kind in enumerate(kinds):
        if kind == "kept":
            label = label_of[i]
            # Agreeing labels, or the polar label beside a neutral one (in the text or in the image).
            text, image = [(label, label), ("neutral", label), (label, "neutral")][i % 3 if label != "neutral" else 0]
        elif kind == "conflict":
            text, image = ("positive", "negative") if i % 20 == 9 else ("negative", "positive")
        else:
            text, image = "", MVSA_LABELS[i % 3]
        if variant == "single":
            samples.append([(text, image)])
            continue
        texts = [str(label) for label in rng.permutation(MVSA_LABELS)] if kind == "no_majority" else _votes(text, rng)
        samples.append(list(zip(texts, _votes(image, rng))))
    return write_mvsa_samples(root, samples, seed)
