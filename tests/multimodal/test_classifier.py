from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from ml_optim_plugins import GatedFusion, MultimodalClassifier, SumFusion

from ..conftest import make_tiny_datamodule, make_tiny_model


def tiny_trainer(tmp_path, **overrides) -> pl.Trainer:
    args = dict(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )
    args.update(overrides)
    return pl.Trainer(**args)


class RecordModalityOutputs(Callback):
    """What a modality-aware callback sees after each training batch."""

    def __init__(self) -> None:
        self.seen: list[tuple[dict[str, tuple], tuple]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append(
            ({k: tuple(v.shape) for k, v in pl_module.modality_logits.items()}, tuple(pl_module.modality_targets.shape))
        )
        assert torch.equal(pl_module.modality_targets, batch["label"])


@pytest.mark.parametrize("fusion_cls", [SumFusion, GatedFusion])
def test_fit_logs_fused_and_per_modality_metrics(tmp_path, fusion_cls):
    model, dm = make_tiny_model(fusion=fusion_cls()), make_tiny_datamodule()
    recorder = RecordModalityOutputs()
    trainer = tiny_trainer(tmp_path, callbacks=[recorder], limit_train_batches=2, limit_val_batches=1)
    trainer.fit(model, dm)
    metrics = trainer.callback_metrics
    for split in ("train", "val"):
        for name in ("loss", "acc", "f1", "image/acc", "image/f1", "image/loss", "text/acc", "text/f1", "text/loss"):
            key = f"{split}/{name}" if f"{split}/{name}" in metrics else f"{split}/{name}_epoch"
            assert key in metrics, f"{key} not logged; got {sorted(metrics)}"
            assert torch.isfinite(metrics[key])
    assert 0.0 <= float(metrics["val/acc"]) <= 1.0
    assert recorder.seen == [({"image": (8, 3), "text": (8, 3)}, (8,))] * 2


def test_classifier_learns_a_fixed_batch(tmp_path):
    torch.manual_seed(0)
    model = make_tiny_model(optimizer=lambda params: torch.optim.Adam(params, lr=3e-3))
    dm = make_tiny_datamodule(train_size=8, batch_size=8)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    optimizer = model.configure_optimizers()
    losses = []
    for _ in range(12):  # under 0.3x the first loss from step 8 on (0.15x at step 12)
        optimizer.zero_grad()
        loss = model.step(batch, "train")
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_test_and_predict(tmp_path, tiny_model):
    from PIL import Image

    posts = tmp_path / "posts"
    posts.mkdir()
    for i in range(10):
        Image.new("RGB", (32, 32), (20 * i, 80, 160)).save(posts / f"{i}.jpg")
        (posts / f"{i}.txt").write_text(f"the film was {'great' if i % 2 else 'awful'}")
    data = make_tiny_datamodule(predict=str(posts))
    trainer = tiny_trainer(tmp_path, limit_test_batches=1)
    results = trainer.test(tiny_model, data, verbose=False)
    assert {"test/acc", "test/f1", "test/image/acc", "test/text/acc"} <= set(results[0])
    first, second = trainer.predict(tiny_model, data)  # the 10 inputs of predict, in batches of 8
    torch.testing.assert_close(first["probs"].sum(-1), torch.ones(8))
    assert torch.equal(first["preds"], first["probs"].argmax(-1))
    assert torch.cat([first["index"], second["index"]]).tolist() == list(range(10))
    assert set(first["modality_probs"]) == {"image", "text"}
    torch.testing.assert_close(second["modality_probs"]["image"].sum(-1), torch.ones(2))


def test_scheduler_is_returned_with_its_interval():
    model = MultimodalClassifier(
        {"a": nn.Linear(2, 4)},
        num_classes=2,
        feature_dims={"a": 4},
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1),
        scheduler_interval="epoch",
    )
    config = model.configure_optimizers()
    assert isinstance(config["optimizer"], torch.optim.AdamW)
    assert config["lr_scheduler"]["interval"] == "epoch"


def test_nan_loss_fails_with_a_clear_error(tiny_model, tiny_datamodule):
    tiny_datamodule.setup("fit")
    batch = next(iter(tiny_datamodule.train_dataloader()))
    batch["image"][0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="train loss is nan"):
        tiny_model.step(batch, "train")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"encoders": {}}, ValueError, "encoders is empty"),
        ({"encoders": {"label": nn.Linear(2, 2)}, "feature_dims": {"label": 2}}, ValueError, "label_key 'label'"),
        ({"encoders": {"a": nn.Linear(2, 2)}}, ValueError, "has no output_dim"),
        ({"encoders": {"a": nn.Linear(2, 2)}, "feature_dims": {"b": 2}}, ValueError, "do not match"),
        ({"encoders": {"a": nn.Linear(2, 2)}, "feature_dims": {"a": 2}, "fusion": nn.Linear(2, 2)}, TypeError, "Fusion"),
        ({"encoders": {"a": nn.Linear(2, 2)}, "feature_dims": {"a": 2}, "scheduler_interval": "batch"}, ValueError, "'batch'"),
        ({"encoders": {"a": nn.Linear(2, 2)}, "feature_dims": {"a": 2}, "class_names": ["x"]}, ValueError, "class_names"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        MultimodalClassifier(**kwargs)


def test_batch_without_a_modality_names_it(tiny_model):
    with pytest.raises(KeyError, match=r"lacks modalities \['text'\]"):
        tiny_model({"image": torch.randn(2, 3, 32, 32), "label": torch.zeros(2, dtype=torch.long)})


def test_auxiliary_unimodal_losses_are_added_with_their_weight():
    import torch.nn.functional as F

    from ml_optim_plugins import SumFusion

    torch.manual_seed(0)
    model = MultimodalClassifier(
        {"a": torch.nn.Linear(4, 8), "b": torch.nn.Linear(6, 8)}, fusion=SumFusion(), num_classes=3,
        feature_dims={"a": 8, "b": 8}, aux_loss_weight=0.3,
    )
    assert set(model.aux_heads) == {"a", "b"}
    assert {g["name"] for g in model.param_groups()} == {"encoders.a", "encoders.b", "fusion"}
    batch = {"a": torch.randn(5, 4), "b": torch.randn(5, 6), "label": torch.tensor([0, 1, 2, 0, 1])}
    objective = model.training_step(batch, 0)
    features = model.compute_features(batch)
    fused = F.cross_entropy(model.fusion(features), batch["label"])
    aux = sum(F.cross_entropy(model.aux_heads[m](features[m]), batch["label"]) for m in "ab")
    assert objective.item() == pytest.approx((fused + 0.3 * aux).item(), rel=1e-6)
    objective.backward()
    assert model.aux_heads["a"].weight.grad is not None


class Smoothed(MultimodalClassifier):
    """Label smoothing on the fused loss only; the modality losses are counted."""

    modality_calls: list[str] = []

    def compute_loss(self, logits, targets):
        return torch.nn.functional.cross_entropy(logits, targets, label_smoothing=0.2)

    def compute_modality_loss(self, modality, logits, targets):
        self.modality_calls.append(modality)
        return torch.nn.functional.cross_entropy(logits, targets)


def test_loss_hooks_set_the_objective_and_the_auxiliary_losses():
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = Smoothed({"a": torch.nn.Linear(4, 8), "b": torch.nn.Linear(6, 8)}, fusion=SumFusion(), num_classes=3,
                     feature_dims={"a": 8, "b": 8}, aux_loss_weight=0.3)
    batch = {"a": torch.randn(5, 4), "b": torch.randn(5, 6), "label": torch.tensor([0, 1, 2, 0, 1])}
    objective = model.training_step(batch, 0)
    features = model.compute_features(batch)
    fused = F.cross_entropy(model.fusion(features), batch["label"], label_smoothing=0.2)
    aux = sum(F.cross_entropy(model.aux_heads[m](features[m]), batch["label"]) for m in "ab")
    assert objective.item() == pytest.approx((fused + 0.3 * aux).item(), rel=1e-6)
    assert model.modality_calls == ["a", "b", "a", "b"]  # the auxiliary heads, then the logged per-modality losses


def test_build_metrics_adds_a_metric_to_every_split_and_head():
    from torchmetrics.classification import MulticlassAUROC

    class WithAuroc(MultimodalClassifier):
        def build_metrics(self):
            return {**super().build_metrics(), "auroc": MulticlassAUROC(self.num_classes)}

    model = WithAuroc({"a": torch.nn.Linear(4, 8)}, num_classes=3, feature_dims={"a": 8})
    names = set(model.metrics["val_fused"].keys(keep_base=False))
    assert names == {"val/acc", "val/f1", "val/f1_weighted", "val/auroc"}
    assert "test/a/auroc" in model.metrics["test_a"].keys(keep_base=False)


def test_no_auxiliary_heads_by_default_and_negative_weight_rejected():
    model = MultimodalClassifier({"a": torch.nn.Linear(4, 8)}, num_classes=3, feature_dims={"a": 8})
    assert model.aux_heads is None
    with pytest.raises(ValueError, match="aux_loss_weight must be a finite number >= 0"):
        MultimodalClassifier({"a": torch.nn.Linear(4, 8)}, num_classes=3, feature_dims={"a": 8}, aux_loss_weight=-1)


def test_evaluation_losses_are_means_over_samples_before_and_after_fit(tmp_path):
    """Batches of 4 and 3: each logged loss is the mean over the 7 samples, not over the 2 batch means; a validate
    before fit (inference mode) and fit's own validation (no_grad) share the loss metrics."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    model = MultimodalClassifier({"a": nn.Linear(4, 8), "b": nn.Linear(6, 8)}, fusion=SumFusion(), num_classes=3,
                                 feature_dims={"a": 8, "b": 8}, aux_loss_weight=0.5)
    samples = [{"a": torch.randn(4), "b": torch.randn(6), "label": torch.tensor(i % 3)} for i in range(7)]
    everything = {key: torch.stack([s[key] for s in samples]) for key in samples[0]}

    def expected() -> dict[str, float]:
        with torch.no_grad():
            features = model.compute_features(everything)
            losses = {"val/loss": F.cross_entropy(model.fusion(features), everything["label"])}
            targets = everything["label"]
            for name, logits in model.modality_outputs(features).items():
                losses[f"val/{name}/loss"] = F.cross_entropy(logits, targets)
                losses[f"val/{name}/aux_loss"] = F.cross_entropy(model.aux_heads[name](features[name]), targets)
        return {key: float(value) for key, value in losses.items()}

    trainer = tiny_trainer(tmp_path, max_steps=2, num_sanity_val_steps=0)
    for run in (lambda: trainer.validate(model, DataLoader(samples, batch_size=4), verbose=False),
                lambda: trainer.fit(model, DataLoader(samples, batch_size=4), DataLoader(samples, batch_size=4))):
        run()
        want = expected()
        got = {key: float(trainer.callback_metrics[key]) for key in want}
        assert got == pytest.approx(want, rel=1e-6)
