"""ModalityDropout: never every modality of a sample, keep frequencies, unbiased rescaling, eval, the classifier."""

from __future__ import annotations

import pytest
import torch

from ml_optim_plugins import ModalityDropout, MultimodalClassifier, SumFusion
from ml_optim_plugins.functional import modality_keep_mask
from ml_optim_plugins.regularization.modality_dropout import keep_probabilities


@pytest.mark.parametrize("rates", [{"a": 0.95, "b": 0.95}, {"a": 0.9, "b": 0.8, "c": 0.99}, {"a": 0.5, "b": 0.0}])
def test_no_sample_ever_loses_every_modality(rates):
    masks = modality_keep_mask(200_000, rates, torch.Generator().manual_seed(0))
    assert torch.stack(list(masks.values())).any(0).all()


@pytest.mark.parametrize("rates", [{"a": 0.3, "b": 0.3}, {"a": 0.6, "b": 0.2, "c": 0.9}])
def test_keep_frequencies_match_their_probability(rates):
    masks = modality_keep_mask(400_000, rates, torch.Generator().manual_seed(1))
    expected = keep_probabilities(rates)
    for name, mask in masks.items():
        assert mask.float().mean().item() == pytest.approx(expected[name], abs=0.003)
    # (1 - p_m) + prod(p) / M
    assert expected["a"] == pytest.approx(1 - rates["a"] + torch.tensor(list(rates.values())).prod().item() / len(rates))


def test_dropped_features_are_filled_and_kept_ones_rescaled_without_bias():
    torch.manual_seed(0)
    layer = ModalityDropout({"image": 0.5, "text": 0.2}).train()
    features = {"image": torch.full((100_000, 3), 2.0), "text": torch.full((100_000, 2), -1.0)}
    out = layer(features)
    probability = keep_probabilities({"image": 0.5, "text": 0.2})
    assert out["image"][:, 0].unique().tolist() == pytest.approx([0.0, 2.0 / probability["image"]])
    for name in features:
        assert out[name].mean().item() == pytest.approx(features[name].mean().item(), rel=0.02)
    rows_dropped = (out["image"] == 0).all(1) & (out["text"] == 0).all(1)
    assert not rows_dropped.any()


def test_eval_and_a_single_modality_are_left_alone():
    features = {"image": torch.randn(4, 3), "text": torch.randn(4, 2)}
    out = ModalityDropout(0.9).eval()(features)
    assert all(out[k] is features[k] for k in features)
    only = {"image": torch.randn(4, 3)}
    assert ModalityDropout(0.9).train()(only)["image"] is only["image"]


def test_bad_rates_are_rejected():
    with pytest.raises(ValueError, match=r"p\['text'\] must be a dropout rate in \[0, 1\), got 1.0"):
        ModalityDropout({"image": 0.2, "text": 1.0})
    with pytest.raises(ValueError, match=r"rates name \['audio'\], but the features have \['image', 'text'\]"):
        ModalityDropout({"audio": 0.2}).train()({"image": torch.ones(2, 1), "text": torch.ones(2, 1)})


def test_classifier_fuses_dropped_features_but_records_modality_logits_from_all():
    torch.manual_seed(0)
    model = MultimodalClassifier(
        {"a": torch.nn.Linear(4, 8), "b": torch.nn.Linear(6, 8)}, fusion=SumFusion(), num_classes=3,
        feature_dims={"a": 8, "b": 8}, modality_dropout=ModalityDropout(0.5),
    )
    batch = {"a": torch.randn(64, 4), "b": torch.randn(64, 6), "label": torch.randint(0, 3, (64,))}
    model.train()
    loss = model.training_step(batch, 0)
    features = model.compute_features(batch)
    undropped = torch.nn.functional.cross_entropy(model.fusion(features), batch["label"])
    assert not torch.isclose(loss, undropped)
    assert torch.allclose(model.modality_logits["a"], model.fusion.modality_logits(features)["a"])
    model.eval()
    assert torch.allclose(model(batch), model.fusion(features))
