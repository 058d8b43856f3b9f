"""Per-modality scoring choices (``ModalityBalancer(scores=...)``, ``MultimodalClassifier(modality_scoring=...)``):
which logits each choice records, and the choices that are refused, at construction or at fit start."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from ml_optim_plugins import ConcatFusion, GatedFusion, ModalityBalancer
from tests.balancing.tiny import loader, tiny_classifier


@pytest.mark.parametrize(
    ("fusion", "scores", "message"),
    [
        (GatedFusion(), "head_split", "GatedFusion couples the modalities"),
        (None, "aux_heads", "'aux_heads' scoring needs unimodal heads"),
    ],
)
def test_meaningless_scoring_choices_are_errors(fusion, scores, message):
    model = tiny_classifier(fusion=fusion) if fusion is not None else tiny_classifier()
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[ModalityBalancer("ogm", scores=scores)])
    with pytest.raises(ValueError, match=message):
        trainer.fit(model, loader())


def test_unknown_scoring_is_refused_at_construction():
    with pytest.raises(ValueError, match="expected one of auto, head_split, masking, aux_heads or None"):
        ModalityBalancer("ogm", scores="shapley")


@pytest.mark.parametrize("scores", ["masking", "aux_heads", "head_split"])
def test_scoring_choices_decide_the_recorded_logits(scores):
    model = tiny_classifier(aux_loss_weight=0.5, modality_scoring=scores)
    batch = next(iter(loader()))
    model.training_step(batch, 0)
    features = model.compute_features(batch)
    expected = {
        "masking": model.fusion.masked_logits(features),
        "aux_heads": {m: model.aux_heads[m](features[m]) for m in ("a", "b")},
        "head_split": model.fusion.modality_logits(features),
    }[scores]
    for m in ("a", "b"):
        assert torch.allclose(model.modality_logits[m], expected[m].detach())
    assert not torch.allclose(model.fusion.masked_logits(features)["a"], model.fusion.modality_logits(features)["a"])
    model.validation_step(batch, 0)  # validation's per-modality metrics use the same scoring
    assert model.metrics["val_a"]["acc"].update_count == 1


def test_masked_scores_are_deterministic_with_fusion_dropout():
    model = tiny_classifier(fusion=ConcatFusion(dropout=0.5))
    model.train()
    features = model.compute_features(next(iter(loader())))
    first, second = model.fusion.masked_logits(features), model.fusion.masked_logits(features)
    assert all(torch.equal(first[m], second[m]) for m in first) and model.fusion.training
