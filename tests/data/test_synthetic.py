from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from ml_optim_plugins import SyntheticSentimentDataModule
from ml_optim_plugins.data import SyntheticSentimentDataset
from ml_optim_plugins.data.synthetic import _NEGATIVE, _NEUTRAL, _POSITIVE, make_text


def test_same_seed_same_sample_in_any_order():
    a, b = SyntheticSentimentDataset(50, seed=7), SyntheticSentimentDataset(50, seed=7)
    for index in (49, 3, 17):
        x, y = a[index], b[index]
        assert torch.equal(x["image"], y["image"]) and x["text"] == y["text"] and x["label"] == y["label"]


@pytest.mark.parametrize("other", [{"seed": 8}, {"split": "val"}])
def test_other_seed_or_split_gives_other_samples(other):
    base = SyntheticSentimentDataset(20, seed=7)
    changed = SyntheticSentimentDataset(20, **{"seed": 7, **other})
    assert [base[i]["text"] for i in range(20)] != [changed[i]["text"] for i in range(20)]


@pytest.mark.parametrize(("image_noise", "text_noise"), [(0.0, 0.5), (0.4, 0.1)])
def test_cue_corruption_rates_follow_the_knobs(image_noise, text_noise):
    ds = SyntheticSentimentDataset(1500, image_noise=image_noise, text_noise=text_noise, image_size=16, seed=1)
    samples = [ds[i] for i in range(len(ds))]
    for key, noise in (("image_cue", image_noise), ("text_cue", text_noise)):
        counts = Counter(s[key] for s in samples)
        assert abs(1 - counts["present"] / len(ds) - noise) < 0.04
        assert abs(counts["misleading"] - counts["missing"]) < 0.1 * len(ds) * max(noise, 0.01) + 20
    labels = Counter(s["label"] for s in samples)
    assert all(abs(labels[c] / len(ds) - 1 / 3) < 0.05 for c in range(3))


def words_of(text: str) -> set[str]:
    return set(text.replace(".", " ").split())


def test_text_cues_follow_the_sentiment_rules():
    gen = np.random.default_rng(0)
    for label in range(3):
        for _ in range(200):
            words = words_of(make_text(gen, label, 3))
            negated = "not" in words
            if label == 2:  # positive: a positive word, never negated
                assert words & set(_POSITIVE) and not negated
            elif label == 0:  # negative: a negative word, or "not" + a positive one
                assert (words & set(_POSITIVE) and negated) or (words & set(_NEGATIVE) and not negated)
            else:  # neutral: a neutral word, or "not" + a negative one
                assert (words & set(_NEGATIVE) and negated) or (words & set(_NEUTRAL) and not negated)
    filler_only = words_of(make_text(gen, None, 3))
    assert not filler_only & set(_POSITIVE + _NEGATIVE + _NEUTRAL) and "not" not in filler_only


def test_missing_image_cue_draws_no_face():
    ds = SyntheticSentimentDataset(300, image_noise=1.0, misleading_share=0.0, image_size=32)
    present = SyntheticSentimentDataset(300, image_noise=0.0, image_size=32)
    # the face is a large yellowish disc: red+green high, blue low; its share of pixels separates the two sets
    def yellow_share(image):
        r, g, b = image
        return ((r > 0.6) & (g > 0.5) & (b < 0.45)).float().mean().item()

    with_face = sum(yellow_share(present[i]["image"]) for i in range(100)) / 100
    without = sum(yellow_share(ds[i]["image"]) for i in range(100)) / 100
    assert with_face > without + 0.05


def test_two_class_data():
    dm = SyntheticSentimentDataModule(num_classes=2, train_size=40, val_size=8, test_size=8, image_size=24, batch_size=40)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert dm.class_names == ("negative", "positive") and set(batch["label"].tolist()) == {0, 1}


def test_datamodule_batches_are_tokenised_and_deterministic(tiny_datamodule):
    tiny_datamodule.setup("fit")
    first = next(iter(tiny_datamodule.val_dataloader()))
    again = next(iter(tiny_datamodule.val_dataloader()))
    assert first["image"].shape == (8, 3, 32, 32) and first["image"].dtype == torch.float32
    assert first["text"]["input_ids"].shape[0] == 8 and first["text"]["input_ids"].shape[1] <= 24
    assert torch.equal(first["text"]["input_ids"], again["text"]["input_ids"])
    assert tiny_datamodule.num_classes == 3


def test_raw_strings_without_tokenizer():
    dm = SyntheticSentimentDataModule(train_size=4, val_size=4, test_size=4, image_size=16, batch_size=4, tokenizer=None)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch["text"], list) and all(isinstance(t, str) for t in batch["text"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 4}, "2 or 3 classes"),
        ({"image_noise": 1.5}, r"image_noise must be a finite number in \[0, 1\], got 1.5"),
        ({"image_size": 8}, "too small"),
        ({"train_size": 0}, "length=0"),
        ({"batch_size": 0}, "batch_size=0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticSentimentDataModule(**kwargs)


def oracle_accuracy(dataset: SyntheticSentimentDataset, modalities: tuple[str, ...], draws: int) -> float:
    """The Bayes decision on cues drawn by the dataset's own sampler (no images), scored against the labels."""
    rng = np.random.default_rng(0)
    noises = {"image": dataset.image_noise, "text": dataset.text_noise}
    correct = 0
    for _ in range(draws):
        label = int(rng.integers(dataset.num_classes))
        cues = [dataset._cue(rng, label, noises[m])[0] for m in modalities]
        scores = [
            np.prod([dataset._cue_probability(c, k, noises[m]) for c, m in zip(cues, modalities)])
            for k in range(dataset.num_classes)
        ]
        correct += int(np.argmax(scores)) == label if max(scores) > min(scores) else 1 / dataset.num_classes
    return correct / draws


@pytest.mark.parametrize("modalities", [("image", "text"), ("image",), ("text",)])
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [({}, None), ({"image_noise": 0.0, "text_noise": 0.0}, 1.0), ({"num_classes": 2, "misleading_share": 0.0}, None)],
)
def test_bayes_accuracy_is_what_the_best_decision_on_the_cues_scores(modalities, overrides, expected):
    dataset = SyntheticSentimentDataset(4, **overrides)
    ceiling = dataset.bayes_accuracy(modalities)
    if expected is not None:
        assert ceiling == pytest.approx(expected)
    draws = 20_000
    assert oracle_accuracy(dataset, modalities, draws) == pytest.approx(ceiling, abs=4 * (0.25 / draws) ** 0.5)


def test_bayes_accuracy_of_the_quick_start_data():
    data = SyntheticSentimentDataModule(tokenizer=None)  # the quick start's noise: 0.3 per modality, half misleading
    assert data.bayes_accuracy() == pytest.approx(0.8125)
    assert data.bayes_accuracy(["image"]) == data.bayes_accuracy(["text"]) == pytest.approx(0.75)
    only_missing = SyntheticSentimentDataset(4, image_noise=1.0, text_noise=1.0, misleading_share=0.0)
    assert only_missing.bayes_accuracy() == pytest.approx(1 / 3)  # no cue at all: chance
    with pytest.raises(ValueError, match=r"modalities=\['audio'\]"):
        data.bayes_accuracy(["audio"])
