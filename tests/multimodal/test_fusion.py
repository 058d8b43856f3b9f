from __future__ import annotations

import pytest
import torch

from ml_optim_plugins import ConcatFusion, Fusion, GatedFusion, SumFusion

DIMS = {"image": 5, "text": 7}


def features(batch: int = 4, dims: dict[str, int] = DIMS) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {name: torch.randn(batch, dim, generator=gen) for name, dim in dims.items()}


@pytest.mark.parametrize("fusion_cls", [ConcatFusion, SumFusion, GatedFusion])
@pytest.mark.parametrize("num_classes", [2, 5])
def test_shapes_of_fused_and_per_modality_logits(fusion_cls, num_classes):
    fusion = fusion_cls(in_dims=DIMS, num_classes=num_classes)
    feats = features()
    assert fusion(feats).shape == (4, num_classes)
    parts = fusion.modality_logits(feats)
    assert sorted(parts) == sorted(DIMS)
    assert all(p.shape == (4, num_classes) for p in parts.values())


@pytest.mark.parametrize("feature_norm", ["none", "batch"])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("fusion_cls", [ConcatFusion, SumFusion])
@pytest.mark.parametrize("dims", [DIMS, {"a": 3, "b": 4, "c": 2}])
def test_linear_late_fusions_split_exactly(fusion_cls, dims, training, feature_norm):
    fusion = fusion_cls(in_dims=dims, num_classes=3, feature_norm=feature_norm).train(training)
    feats = features(dims=dims)
    fused = fusion(feats)
    parts = fusion.modality_logits(feats)
    torch.testing.assert_close(sum(parts.values()), fused)


@pytest.mark.parametrize("fusion_cls", [ConcatFusion, SumFusion])
def test_batch_feature_norm_standardises_each_modality_once_per_step(fusion_cls):
    """Features of very different scales reach the head standardised; the per-modality logits of the same batch read
    the batch's statistics without counting it a second time in the running ones."""
    fusion = fusion_cls(in_dims=DIMS, num_classes=3, feature_norm="batch")
    feats = features(batch=64)  # the text features at a unit-norm sentence embedding's scale
    feats = {"image": feats["image"] * 100 + 7, "text": feats["text"] * 0.05}
    for name, normalized in fusion.normalized(feats).items():
        torch.testing.assert_close(normalized.mean(0), torch.zeros(DIMS[name]), atol=1e-5, rtol=0)
        torch.testing.assert_close(normalized.var(0, unbiased=False), torch.ones(DIMS[name]), atol=1e-2, rtol=0)
    fusion(feats)
    running = {name: norm.running_mean.clone() for name, norm in fusion.norms.items()}
    fusion.modality_logits(feats)
    for name, norm in fusion.norms.items():
        assert torch.equal(norm.running_mean, running[name]) and norm.num_batches_tracked == 2
    fusion.eval()  # running statistics in eval: the output no longer depends on the rest of the batch
    torch.testing.assert_close(fusion({k: v[:1] for k, v in feats.items()}), fusion(feats)[:1])


def test_concat_split_is_weight_slice_plus_shared_bias():
    fusion = ConcatFusion(in_dims=DIMS, num_classes=3)
    feats = features()
    w, b = fusion.head.weight, fusion.head.bias
    expected_text = feats["text"] @ w[:, 5:].T + b / 2
    torch.testing.assert_close(fusion.modality_logits(feats)["text"], expected_text)


def test_gated_fusion_masks_other_modalities_with_zeros():
    fusion = GatedFusion(in_dims=DIMS, num_classes=3, hidden_dim=6).eval()
    feats = features()
    masked = {"image": feats["image"], "text": torch.zeros_like(feats["text"])}
    torch.testing.assert_close(fusion.modality_logits(feats)["image"], fusion(masked))
    # the gate couples modalities: the per-modality logits do not sum to the fused ones
    assert not torch.allclose(sum(fusion.modality_logits(feats).values()), fusion(feats))


def test_gated_fusion_mean_neutral_tracks_running_mean():
    fusion = GatedFusion(in_dims=DIMS, num_classes=3, hidden_dim=6, neutral="mean")
    shifted = {name: feat + 3.0 for name, feat in features(batch=64).items()}
    fusion.train()
    for _ in range(1000):
        fusion(shifted)
    fusion.eval()
    running = fusion.neutral_features("text", shifted["text"])[0]
    torch.testing.assert_close(running, shifted["text"].mean(0), atol=0.05, rtol=0)
    masked = {"image": shifted["image"], "text": running.expand_as(shifted["text"])}
    torch.testing.assert_close(fusion.modality_logits(shifted)["image"], fusion(masked))


def test_build_later_then_forward():
    fusion = SumFusion(dropout=0.2)
    assert not fusion.built
    fusion.build(DIMS, 3)
    assert fusion.built and fusion(features()).shape == (4, 3)


@pytest.mark.parametrize(
    ("action", "error", "match"),
    [
        (lambda: ConcatFusion(in_dims=DIMS), ValueError, "both in_dims and num_classes"),
        (lambda: ConcatFusion(in_dims=DIMS, num_classes=1), ValueError, "at least 2 classes"),
        (lambda: ConcatFusion(in_dims={"image": 0}, num_classes=2), ValueError, "positive integers"),
        (lambda: GatedFusion(neutral="median"), ValueError, "neutral='median'"),
        (lambda: GatedFusion(hidden_dim=0), ValueError, "hidden_dim=0"),
        (lambda: SumFusion(feature_norm="layer"), ValueError, "feature_norm='layer'.*'none' or 'batch'"),
        (lambda: ConcatFusion()(features()), RuntimeError, "not built"),
        (lambda: ConcatFusion(in_dims=DIMS, num_classes=2)({"image": torch.zeros(1, 5)}), KeyError, "built for"),
        (lambda: ConcatFusion(in_dims=DIMS, num_classes=2).build(DIMS, 2), RuntimeError, "already built"),
    ],
)
def test_bad_configuration_fails_clearly(action, error, match):
    with pytest.raises(error, match=match):
        action()


def test_fusion_base_is_abstract():
    with pytest.raises(NotImplementedError):
        Fusion().build(DIMS, 2)
