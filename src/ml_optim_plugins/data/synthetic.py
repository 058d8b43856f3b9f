"""Built-in synthetic image + text sentiment data: deterministic from a seed, no files needed.

Each sample draws a label, then an independent *cue status* per modality: ``"present"`` (the cue shows the label),
``"missing"`` (no cue at all) or ``"misleading"`` (the cue of another class). So each modality alone is informative
but incomplete, and a model that fuses both beats either.

* Images: a cluttered, noisy scene in which a small drawn face carries the sentiment in the curve of its mouth
  (smile, flat, frown). Background and clutter colours are random, so a CNN has to learn shape, which is slow: image is
  the weak modality.
* Texts: short reviews in which one sentence carries a sentiment word, possibly intensified or negated
  ("not great" is negative, "not terrible" neutral), among neutral filler sentences. A pretrained text encoder reads
  this almost at once: text is the easy, dominant modality.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from ml_optim_plugins.data.base import MultimodalDataModule
from ml_optim_plugins.data.transforms import image_data_config
from ml_optim_plugins.hyperparameters import check_number

CUE_STATUSES = ("present", "missing", "misleading")
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}

_POSITIVE = ("great", "wonderful", "lovely", "delightful", "excellent", "amazing", "fantastic", "superb", "charming")
_NEGATIVE = ("terrible", "awful", "dreadful", "horrible", "miserable", "disappointing", "boring", "annoying", "poor")
_NEUTRAL = ("ordinary", "average", "typical", "standard", "plain", "routine", "middling", "unremarkable")
_INTENSIFIERS = ("very", "really", "truly", "extremely", "quite", "incredibly")
_SUBJECTS = (
    "the film", "the meal", "the hotel", "the concert", "the trip", "the service", "the book", "the game",
    "the party", "this place", "our visit", "the show",
)
_FILLERS = (
    "we arrived just after noon", "it was a tuesday", "the parking was on the left", "my cousin came along",
    "there were many people", "i took the bus there", "it lasted about two hours", "the room had blue walls",
    "we paid at the door", "the staff wore black shirts", "it is near the station", "we went back home by train",
)


def _text_cue(rng: np.random.Generator, sentiment: int, num_classes: int) -> str:
    """One sentence expressing ``sentiment`` (0 = negative, last = positive, middle = neutral)."""
    subject = _SUBJECTS[rng.integers(len(_SUBJECTS))]
    intensifier = f"{_INTENSIFIERS[rng.integers(len(_INTENSIFIERS))]} " if rng.random() < 0.4 else ""
    negated = rng.random() < 0.3
    if sentiment == num_classes - 1:  # positive; two-class data also says "not <negative>"
        words, negation = _POSITIVE, "" if num_classes == 3 or not negated else "not "
        if negation:
            words = _NEGATIVE
    elif sentiment == 0:  # negative: a negative word, or a negated positive one
        words, negation = (_POSITIVE, "not ") if negated else (_NEGATIVE, "")
    else:  # neutral: a neutral word, or a negated negative one
        words, negation = (_NEGATIVE, "not ") if negated else (_NEUTRAL, "")
    word = words[rng.integers(len(words))]
    return f"{subject} was {negation}{intensifier if not negation else ''}{word}"


def make_text(rng: np.random.Generator, cue: int | None, num_classes: int) -> str:
    """A short review carrying the sentiment ``cue`` (``None``: filler only) among 1-3 neutral filler sentences."""
    picks = rng.choice(len(_FILLERS), size=int(rng.integers(1, 4)), replace=False)
    sentences = [_FILLERS[i] for i in picks]
    if cue is not None:
        sentences.insert(int(rng.integers(len(sentences) + 1)), _text_cue(rng, cue, num_classes))
    return ". ".join(sentences) + "."


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, size=3))


def make_image(rng: np.random.Generator, cue: int | None, num_classes: int, size: int = 64) -> torch.Tensor:
    """A ``(3, size, size)`` float image in [0, 1]: clutter, noise, and a face whose mouth shows ``cue``."""
    image = Image.new("RGB", (size, size), _random_colour(rng))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 8))):  # clutter
        x0, y0 = rng.integers(-size // 4, size, size=2)
        w, h = rng.integers(size // 10, size // 2, size=2)
        shape = rng.integers(3)
        box = (int(x0), int(y0), int(x0 + w), int(y0 + h))
        if shape == 0:
            draw.rectangle(box, fill=_random_colour(rng))
        elif shape == 1:
            draw.ellipse(box, fill=_random_colour(rng))
        else:
            draw.line(box, fill=_random_colour(rng), width=int(rng.integers(1, 4)))
    if cue is not None:
        radius = int(rng.integers(size // 6, size // 3))
        cx, cy = (int(v) for v in rng.integers(radius, size - radius, size=2))
        skin = tuple(int(c) for c in np.clip(np.array([235, 200, 80]) + rng.integers(-40, 40, size=3), 0, 255))
        ink = (int(rng.integers(0, 60)),) * 3
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=skin)
        eye = max(1, radius // 6)
        for dx in (-radius // 3, radius // 3):
            draw.ellipse((cx + dx - eye, cy - radius // 3 - eye, cx + dx + eye, cy - radius // 3 + eye), fill=ink)
        half, width = radius // 2, max(1, radius // 8)
        sentiment = cue if num_classes == 3 else 2 * cue  # map two classes onto frown / smile
        if sentiment == 2:  # smile: lower half of an ellipse
            draw.arc((cx - half, cy - half // 2, cx + half, cy + half), 20, 160, fill=ink, width=width)
        elif sentiment == 0:  # frown: upper half, placed lower
            draw.arc((cx - half, cy + radius // 5, cx + half, cy + radius // 5 + half), 200, 340, fill=ink, width=width)
        else:  # neutral: a straight mouth
            draw.line((cx - half, cy + radius // 3, cx + half, cy + radius // 3), fill=ink, width=width)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    noise = torch.from_numpy(rng.normal(0.0, 0.08, size=pixels.shape).astype(np.float32))
    return (pixels + noise).clamp_(0.0, 1.0)


class SyntheticSentimentDataset(Dataset):
    """``length`` image + text sentiment samples, each generated on access from ``(seed, split, index)``.

    Args:
        length: number of samples.
        num_classes: 2 (negative, positive) or 3 (negative, neutral, positive).
        image_noise: fraction of samples whose image cue is missing or misleading.
        text_noise: fraction of samples whose text cue is missing or misleading.
        misleading_share: of the samples whose cue is corrupted, the fraction where it is misleading (else missing).
        image_size: side of the square images.
        seed: base seed; the same seed gives the same samples in any order and any process.
        split: ``"train"``, ``"val"`` or ``"test"``; each split has its own samples.
        mean: per-channel mean subtracted from the pixels (in [0, 1]); ``None`` leaves them in [0, 1].
        std: per-channel standard deviation the pixels are divided by, with ``mean``.

    Example:
        >>> ds = SyntheticSentimentDataset(10, seed=0)
        >>> sample = ds[3]
        >>> sample["image"].shape, sample["label"] in (0, 1, 2), ds[3]["text"] == sample["text"]
        (torch.Size([3, 64, 64]), True, True)
    """

    def __init__(
        self,
        length: int,
        num_classes: int = 3,
        image_noise: float = 0.3,
        text_noise: float = 0.3,
        misleading_share: float = 0.5,
        image_size: int = 64,
        seed: int = 0,
        split: str = "train",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        if length <= 0:
            raise ValueError(f"length={length} must be positive")
        if num_classes not in (2, 3):
            raise ValueError(f"num_classes={num_classes}; the synthetic data has 2 or 3 classes")
        for name, value in (("image_noise", image_noise), ("text_noise", text_noise), ("misleading_share", misleading_share)):
            check_number(name, value, at_least=0, at_most=1)
        if image_size < 16:
            raise ValueError(f"image_size={image_size} is too small to draw a face; use 16 or more")
        if split not in _SPLIT_CODES:
            raise ValueError(f"split={split!r}; expected one of {sorted(_SPLIT_CODES)}")
        self.length = length
        self.num_classes = num_classes
        self.image_noise = image_noise
        self.text_noise = text_noise
        self.misleading_share = misleading_share
        self.image_size = image_size
        self.seed = seed
        self.split = split
        if (mean is None) != (std is None):
            raise ValueError("give mean and std together, or neither")
        self.normalization = None if mean is None else (
            torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1), torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        )

    def __len__(self) -> int:
        return self.length

    def _cue(self, rng: np.random.Generator, label: int, noise: float) -> tuple[int | None, str]:
        if rng.random() >= noise:
            return label, "present"
        if rng.random() < self.misleading_share:
            others = [c for c in range(self.num_classes) if c != label]
            return others[int(rng.integers(len(others)))], "misleading"
        return None, "missing"

    def _cue_probability(self, cue: int | None, label: int, noise: float) -> float:
        if cue is None:
            return noise * (1 - self.misleading_share)
        return 1 - noise if cue == label else noise * self.misleading_share / (self.num_classes - 1)

    def bayes_accuracy(self, modalities: Sequence[str] = ("image", "text")) -> float:
        """The highest expected accuracy any model can reach on this data from ``modalities``: that of the Bayes
        decision given each modality's cue read without error (the class it shows, or none), exact from the
        generating probabilities. A model at this ceiling cannot be beaten by more than sampling noise (a standard
        error of about ``sqrt(acc * (1 - acc) / n)`` on ``n`` test samples).

        Args:
            modalities: the cues the model sees, a non-empty subset of ``("image", "text")``.

        Raises:
            ValueError: an unknown or repeated modality, or none.

        Example:
            >>> ds = SyntheticSentimentDataset(10)
            >>> round(ds.bayes_accuracy(), 4), round(ds.bayes_accuracy(["text"]), 4)
            (0.8125, 0.75)
        """
        noises = {"image": self.image_noise, "text": self.text_noise}
        if not modalities or len(set(modalities)) != len(modalities) or not set(modalities) <= set(noises):
            raise ValueError(f"modalities={list(modalities)!r}; expected a non-empty subset of {sorted(noises)}")
        cues = [None, *range(self.num_classes)]
        total = 0.0
        for observed in itertools.product(cues, repeat=len(modalities)):
            joint = [
                math.prod(self._cue_probability(cue, label, noises[m]) for cue, m in zip(observed, modalities))
                for label in range(self.num_classes)
            ]
            total += max(joint) / self.num_classes  # labels are drawn uniformly
        return total

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        rng = np.random.default_rng((self.seed, _SPLIT_CODES[self.split], index))
        label = int(rng.integers(self.num_classes))
        image_cue, image_status = self._cue(rng, label, self.image_noise)
        text_cue, text_status = self._cue(rng, label, self.text_noise)
        image = make_image(rng, image_cue, self.num_classes, self.image_size)
        if self.normalization is not None:
            image = (image - self.normalization[0]) / self.normalization[1]
        return {
            "image": image,
            "text": make_text(rng, text_cue, self.num_classes),
            "label": label,
            "index": index,
            "image_cue": image_status,
            "text_cue": text_status,
        }


class SyntheticSentimentDataModule(MultimodalDataModule):
    """Synthetic multimodal sentiment data (see :mod:`ml_optim_plugins.data.synthetic`): the quick start's default.

    Defaults make each modality informative but incomplete, and text the easy, dominant modality while the image
    encoder learns slowly: the imbalance that modality balancing exists for. ``docs/data.md`` has measured accuracies.

    Args:
        train_size: training samples.
        val_size: validation samples.
        test_size: test samples.
        num_classes: 2 (negative, positive) or 3 (negative, neutral, positive).
        image_noise: fraction of samples whose image cue is missing or misleading.
        text_noise: fraction of samples whose text cue is missing or misleading.
        misleading_share: of the corrupted cues, the fraction that are misleading rather than missing.
        image_size: side of the square images; ``None``: the input size of ``image_model``.
        image_model: the image encoder's timm architecture: images are normalised with the mean and std of its data
            config (:func:`~ml_optim_plugins.data.transforms.image_data_config`), as its pretrained weights expect.
            ``None`` leaves pixels in [0, 1] (an encoder trained from scratch on this data).
        seed: data seed (independent of the training seed).
        batch_size: samples per batch.
        num_workers: DataLoader worker processes.
        tokenizer: text model whose tokenizer to use; ``None`` keeps raw strings.
        max_length: longest tokenised text.
        predict: image + text inputs to predict on (a manifest of image path and text, an MVSA root, or a folder of
            ``<id>.jpg`` + ``<id>.txt``; see :class:`~ml_optim_plugins.MultimodalDataModule`): their images are
            resized to ``image_size`` and normalised as the generated ones.
        on_bad_rows: ``"raise"`` or ``"skip"``: what a bad input to predict on does.

    Example:
        >>> dm = SyntheticSentimentDataModule(train_size=8, val_size=4, test_size=4, batch_size=4)
        >>> dm.setup("fit")
        >>> batch = next(iter(dm.train_dataloader()))
        >>> batch["image"].shape, batch["label"].shape, dm.num_classes
        (torch.Size([4, 3, 64, 64]), torch.Size([4]), 3)
    """

    def __init__(
        self,
        train_size: int = 2000,
        val_size: int = 500,
        test_size: int = 500,
        num_classes: int = 3,
        image_noise: float = 0.3,
        text_noise: float = 0.3,
        misleading_share: float = 0.5,
        image_size: int | None = 64,
        image_model: str | None = None,
        seed: int = 1234,
        batch_size: int = 32,
        num_workers: int = 0,
        tokenizer: str | None = "all-MiniLM-L6-v2",
        max_length: int = 64,
        predict: str | None = None,
        on_bad_rows: Literal["raise", "skip"] = "raise",
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            tokenizer=tokenizer,
            max_length=max_length,
            predict=predict,
            on_bad_rows=on_bad_rows,
        )
        self.save_hyperparameters()
        sizes = {"train": train_size, "val": val_size, "test": test_size}
        if image_model is None and image_size is None:
            raise ValueError("image_size=None takes the size of image_model; give image_model or an image_size")
        config = None if image_model is None else image_data_config(image_model, image_size)
        image_size = image_size if config is None else config["input_size"][-1]
        common = dict(
            num_classes=num_classes,
            image_noise=image_noise,
            text_noise=text_noise,
            misleading_share=misleading_share,
            image_size=image_size,
            seed=seed,
            mean=None if config is None else config["mean"],
            std=None if config is None else config["std"],
        )
        # Image files (to predict on) are prepared as the generated images: resized to the side they are drawn at,
        # pixels in [0, 1], normalised as above.
        plain = {"interpolation": "bilinear", "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
        self.image_config = {
            **(plain if config is None else config),
            "input_size": (3, image_size, image_size),
            "crop_pct": 1.0,
            "crop_mode": "center",
        }
        # Built eagerly: they are cheap (samples are generated on access) and validate the arguments at once.
        self._all = {split: SyntheticSentimentDataset(size, split=split, **common) for split, size in sizes.items()}

    def bayes_accuracy(self, modalities: Sequence[str] = ("image", "text")) -> float:
        """The accuracy ceiling of this data from ``modalities``
        (:meth:`SyntheticSentimentDataset.bayes_accuracy`; every split shares it).

        Example:
            >>> round(SyntheticSentimentDataModule(tokenizer=None).bayes_accuracy(), 4)
            0.8125
        """
        return self._all["test"].bayes_accuracy(modalities)

    @property
    def class_names(self) -> Sequence[str]:
        return ("negative", "neutral", "positive") if self.hparams.num_classes == 3 else ("negative", "positive")

    def setup(self, stage: str) -> None:
        self.datasets = dict(self._all)
        super().setup(stage)
