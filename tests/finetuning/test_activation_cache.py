"""ActivationCache: encoders split at a block boundary reproduce their forward; outputs and gradients of the trainable
blocks are the same with and without the cache; a staged fit with cache_activations trains as one without; the
refusals (unsplittable encoder, augmented images, frozen blocks in train mode, a split that does not reproduce
forward, inputs that change); invalidation and disk reuse by fingerprint when the split point moves."""

from __future__ import annotations

import copy
import json

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from ml_optim_plugins import (
    ConcatFusion,
    MultimodalClassifier,
    SentenceTransformerTextEncoder,
    Stage,
    StagedFinetuning,
    SyntheticSentimentDataModule,
    TimmImageEncoder,
)
from ml_optim_plugins.finetuning import ActivationCache, activation_splits, split_point
from ml_optim_plugins.multimodal import SplittableEncoder
from tests.finetuning.tiny import SplitTinyLayers, TinyCNN, loader, tiny_staged_model, trainer


@pytest.fixture(scope="module")
def minilm():
    return SentenceTransformerTextEncoder("all-MiniLM-L6-v2", max_seq_length=16)


TEXTS = ["what a lovely day it is today", "not good", "meh", "so happy to see you all again"]


def _encoder(name, minilm):
    torch.manual_seed(0)
    if name == "minilm":
        return copy.deepcopy(minilm)
    if name == "tiny":
        return SplitTinyLayers()
    return TimmImageEncoder(name)


def _inputs(name, encoder, padding=True):
    g = torch.Generator().manual_seed(3)
    if name == "minilm":
        tokenizer = encoder.model[0].tokenizer
        return dict(tokenizer(TEXTS, padding=padding, truncation=True, max_length=16, return_tensors="pt"))
    if name == "tiny":
        return torch.randn(4, 5, generator=g)
    return torch.randn(4, 3, 48, 48, generator=g)


def _freeze_below(encoder, block):
    for module in encoder.split_blocks()[:block]:
        module.eval().requires_grad_(False)


@pytest.mark.parametrize("name", ["test_resnet", "resnet10t", "tf_efficientnet_lite0", "minilm", "tiny"])
def test_split_reproduces_forward_at_every_block(name, minilm):
    encoder = _encoder(name, minilm).eval()
    x = _inputs(name, encoder)
    assert isinstance(encoder, SplittableEncoder)
    blocks = encoder.split_blocks()
    with torch.no_grad():
        full = encoder(x)
        for block in range(1, len(blocks), max(1, len(blocks) // 7)):  # about 7 split points per encoder
            torch.testing.assert_close(encoder.forward_upper(encoder.forward_lower(x, block), block), full,
                                       rtol=0, atol=0)


@pytest.mark.parametrize(("name", "top", "padding"), [
    ("test_resnet", 2, None), ("tf_efficientnet_lite0", 3, None), ("tiny", 2, None),
    ("minilm", 2, True),  # padded to the longest text, as the data modules do: re-padding gives the same batch
    ("minilm", 2, "max_length"),  # padded to 16 tokens, re-padded to the longest text (8): see below
])
def test_outputs_and_gradients_equal_with_and_without_the_cache(name, top, padding, minilm):
    reference = _encoder(name, minilm)
    block = len(reference.split_blocks()) - top
    _freeze_below(reference, block)
    if padding == "max_length":
        # Fewer padded positions change the shape of the dropout masks, so compare without dropout; the rest differs
        # by float rounding (measured: 6e-7 in the outputs, 2e-5 in gradients of magnitude 60).
        reference.eval()
    cached = copy.deepcopy(reference)
    cache = ActivationCache()
    cache.activate("m", cached, block)
    x, ids = _inputs(name, reference, padding=padding), torch.arange(4)

    def run(module, encode):
        torch.manual_seed(1)  # the same dropout masks in the trainable blocks
        out = encode()
        out.pow(2).sum().backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        module.zero_grad(set_to_none=True)
        return out.detach(), grads

    expected, expected_grads = run(reference, lambda: reference(x))
    rounding = padding == "max_length"
    for attempt in ("filled", "served"):
        out, grads = run(cached, lambda: cache.encode("m", cached, x, ids))
        torch.testing.assert_close(out, expected, rtol=1e-5 if rounding else 0, atol=1e-6 if rounding else 0,
                                   msg=attempt)
        assert grads.keys() == expected_grads.keys() and grads, attempt
        for key in grads:
            torch.testing.assert_close(grads[key], expected_grads[key], rtol=1e-5 if rounding else 0,
                                       atol=1e-4 if rounding else 0, msg=f"{attempt}: {key}")
    assert cache.stats()["m"] == {"hits": 4, "misses": 4}
    frozen = {id(p) for m in cached.split_blocks()[:block] for p in m.parameters()}
    assert not any(p.grad is not None for p in cached.parameters() if id(p) in frozen)


def test_split_point_and_which_encoders_are_split(minilm):
    text = copy.deepcopy(minilm)
    top_two = {id(p) for layer in text.model[0].auto_model.encoder.layer[-2:] for p in layer.parameters()}
    assert split_point(text, top_two) == 5  # embeddings + 4 layers below
    image = TimmImageEncoder("test_resnet")
    assert activation_splits({"text": text, "image": image}, top_two) == {"text": 5}  # image entirely frozen
    everything = top_two | {id(p) for p in image.parameters()}
    assert activation_splits({"text": text, "image": image}, everything) == {"text": 5}  # image entirely trainable


def _fit(cache_activations, model_fn, plan_fn, data_fn, epochs=3, **trainer_kwargs):
    pl.seed_everything(0)
    model = model_fn()
    staged = StagedFinetuning(plan_fn(), cache_features=True, cache_activations=cache_activations)
    losses = StepLosses()
    trainer(max_epochs=epochs, callbacks=[staged, losses], **trainer_kwargs).fit(model, **data_fn())
    return model, staged, losses.values


class StepLosses(pl.Callback):
    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(float(outputs["loss"]))


def test_a_short_fit_with_real_encoders_equals_one_without_the_cache(minilm):
    def model():
        return MultimodalClassifier(
            {"image": TimmImageEncoder("test_resnet"), "text": copy.deepcopy(minilm)}, num_classes=3,
            optimizer=lambda groups: torch.optim.AdamW(groups, lr=1e-3))

    def plan():
        return [Stage(trainable=["image[-2:]", "text[-2:]"], name="top")]

    def data():
        return {"datamodule": SyntheticSentimentDataModule(train_size=16, val_size=8, test_size=8, image_size=32,
                                                           batch_size=8, max_length=16)}

    cached, staged, cached_losses = _fit(True, model, plan, data, epochs=2)
    reference, _, losses = _fit(False, model, plan, data, epochs=2)
    assert len(losses) == 4
    assert cached_losses == pytest.approx(losses, rel=1e-5, abs=1e-6)
    for (key, a), b in zip(cached.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=key)
    stats = staged.activation_cache.stats()
    # Epoch 0 fills the cache (2 training batches), epoch 1 is served from it; validation has its own rows.
    assert stats["image"] == stats["text"] == {"hits": 16 + 8, "misses": 16 + 8}
    assert staged.activation_cache.splits == {"image": 6, "text": 5}
    assert cached.activation_cache is None  # detached at teardown


def _tiny_model():
    torch.manual_seed(0)
    return MultimodalClassifier({"image": TinyCNN(), "text": SplitTinyLayers()}, fusion=ConcatFusion(),
                                num_classes=3, optimizer=lambda groups: torch.optim.AdamW(groups, lr=0.05))


def test_the_cache_follows_the_split_point_of_each_stage_and_reuses_files_of_the_same_weights(tmp_path):
    def plan():
        return [Stage(name="probe"), Stage(start_epoch=1, trainable=["text[-1]"], name="top1"),
                Stage(start_epoch=3, trainable=["text[-3:]"], name="top3")]

    seen = []

    class Splits(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            cache = pl_module.activation_cache
            seen.append((cache.splits, cache.filled("text", "train") if cache.active else 0))

    model = _tiny_model()
    staged = StagedFinetuning(plan(), cache_activations=True, cache_dir=tmp_path)
    trainer(max_epochs=4, callbacks=[staged, Splits()]).fit(model, loader(), loader(n=16))
    # 5 blocks (embed, 3 layers, norm): "text[-1]" trains the last layer and the norm (selector blocks join what
    # follows the last layer to it), so the cache holds the input of layer 2 (block 3), then of layer 0 (block 1).
    assert seen == [({}, 0), ({"text": 3}, 48), ({"text": 3}, 48), ({"text": 1}, 48)]
    directory = tmp_path / "activations" / "rank0"
    index = json.loads((directory / "index.json").read_text())
    assert list(index) == ["text"] and (directory / "text" / "train").is_dir()
    # A new cache on the same directory, split at the same block of the same lower weights, reads the rows back;
    # at another block it deletes them.
    encoder = model.encoders["text"]
    _freeze_below(encoder, 2)
    x, ids = torch.stack([s["text"] for s in loader().dataset]), torch.arange(48)
    reopened = ActivationCache(directory)
    reopened.activate("text", encoder, 1)
    reopened.encode("text", encoder, x, ids)
    assert reopened.stats()["text"] == {"hits": 48, "misses": 0}
    moved = ActivationCache(directory)
    moved.activate("text", encoder, 2)
    assert json.loads((directory / "index.json").read_text())["text"] != index["text"]
    assert not (directory / "text").exists()
    moved.encode("text", encoder, x, ids)
    assert moved.stats()["text"] == {"hits": 0, "misses": 48}


def test_a_tiny_staged_fit_trains_the_same_with_the_cache():
    def plan():
        return [Stage(name="probe"), Stage(start_epoch=1, trainable=["text[-2:]"], name="top")]

    def data():
        return {"train_dataloaders": loader(shuffle=True), "val_dataloaders": loader(n=16)}

    cached, staged, cached_losses = _fit(True, _tiny_model, plan, data)
    reference, _, losses = _fit(False, _tiny_model, plan, data)
    # The same up to float rounding: a served row was computed in its epoch-1 batch, and some CPU matmul kernels
    # round a row differently in another batch (measured on an AMD EPYC: 1 ulp in activations, 1.5e-7 relative in the
    # losses; bit for bit on the Intel machines). Serving another sample's rows, or stale ones, differs by far more.
    assert cached_losses[:12] == losses[:12]  # the probe epoch and the epoch that fills the cache: the same floats
    assert cached_losses == pytest.approx(losses, rel=1e-5, abs=1e-6)
    for (key, a), b in zip(cached.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=key)
    assert staged.activation_cache.stats()["text"] == {"hits": 48 + 16, "misses": 48 + 16}


def test_a_run_resumed_inside_a_cached_stage_equals_the_uninterrupted_one(tmp_path):
    """Resumed from the checkpoint of epoch 1 (inside stage "top1", whose text activations are cached), the run rebuilds
    the cache at the same split point from the restored lower weights and ends as the run that never stopped."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(checkpoint=None):
        model = _tiny_model()
        for module in model.modules():  # no dropout noise: the comparison is about the cache, not the RNG
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        staged = StagedFinetuning([Stage(name="probe"), Stage(start_epoch=1, trainable=["text[-1]"], name="top1"),
                                   Stage(start_epoch=3, trainable=["text[-3:]"], name="top3")],
                                  cache_features=True, cache_activations=True)
        losses = StepLosses()
        saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, save_on_train_epoch_end=True)
        trainer(tmp_path, max_epochs=5, callbacks=[staged, losses, saver], enable_checkpointing=True).fit(
            model, loader(), loader(n=16), ckpt_path=checkpoint)  # in order: plain loaders do not resume a shuffle
        return model, staged, losses.values

    straight, straight_plan, straight_losses = run()
    resumed, resumed_plan, resumed_losses = run(tmp_path / "ckpt" / "epoch=1-step=12.ckpt")
    assert resumed_losses == straight_losses[12:]
    for (key, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key
    assert resumed_plan.boundaries == straight_plan.boundaries
    assert resumed_plan.activation_cache.splits == straight_plan.activation_cache.splits == {"text": 1}
    # The resumed run fills its cache again in epoch 2 (48 training and 16 validation samples) and in epoch 3, where
    # "top3" moves the split point; the uninterrupted run had filled epoch 2's rows in epoch 1.
    assert resumed_plan.activation_cache.stats()["text"]["misses"] == 2 * (48 + 16)


def test_a_partly_frozen_encoder_that_cannot_be_split_is_refused_at_setup():
    plan = [Stage(), Stage(start_epoch=1, trainable=["text[-1]"])]
    with pytest.raises(MisconfigurationException, match=r"stage 1 \(stage1\).*'text' encoder: TinyLayers cannot be "
                                                        r"split.*SplittableEncoder"):
        trainer(max_epochs=2, callbacks=[StagedFinetuning(plan, cache_activations=True)]).fit(
            tiny_staged_model(), loader())


def test_timm_architectures_outside_the_supported_families_cannot_be_split():
    with pytest.raises(TypeError, match="MobileNetV3 is not of the EfficientNet or ResNet family"):
        TimmImageEncoder("mobilenetv3_small_050").split_blocks()


class AugmentingData(pl.LightningDataModule):
    def __init__(self, augment: bool = True):
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self):
        return loader()


@pytest.mark.parametrize(("caches", "refused"), [
    ({"cache_activations": True}, r"stage 1 \(top\) would cache the image encoder's lower blocks"),
    # the probe stage keeps the image encoder frozen: its features would be cached as the first epoch's crops drew them
    ({"cache_features": True}, r"stage 0 \(probe\) keeps the image encoder frozen and would cache its features"),
])
def test_augmented_images_are_refused_at_setup(caches, refused):
    model = MultimodalClassifier({"image": TimmImageEncoder("test_resnet"), "text": SplitTinyLayers()}, num_classes=3)
    plan = [Stage(name="probe"), Stage(start_epoch=1, trainable=["image[-1]"], name="top")]
    with pytest.raises(MisconfigurationException, match=refused + r", but AugmentingData augments the training images"):
        trainer(max_epochs=2, callbacks=[StagedFinetuning(plan, **caches)]).fit(
            model, datamodule=AugmentingData(augment=True))


def test_augmented_images_are_allowed_where_only_the_text_features_are_cached():
    model = MultimodalClassifier({"image": TimmImageEncoder("test_resnet"), "text": SplitTinyLayers()}, num_classes=3)
    staged = StagedFinetuning([Stage(trainable=["image"])], cache_features=True)
    trainer(max_epochs=1, callbacks=[staged]).fit(model, datamodule=AugmentingData(augment=True))
    assert staged.cache.active == ["text"] and set(staged.cache.stats()) == {"text"}  # images: encoded every batch


def test_a_frozen_block_in_train_mode_is_refused():
    encoder = TimmImageEncoder("test_resnet")
    _freeze_below(encoder, 5)
    encoder.split_blocks()[1].train()  # a BatchNorm of the frozen stem
    cache = ActivationCache()
    cache.activate("image", encoder, 5)
    with pytest.raises(RuntimeError, match=r"frozen blocks below block 5 must be in eval\(\).*'model.bn1 "):
        cache.encode("image", encoder, torch.randn(2, 3, 32, 32), torch.arange(2))


class WrongSplit(SplitTinyLayers):
    def forward_upper(self, h, block):
        return super().forward_upper(h, block) * 2


def test_a_split_that_does_not_reproduce_forward_is_refused():
    encoder = WrongSplit()
    _freeze_below(encoder, 2)
    cache = ActivationCache()
    cache.activate("text", encoder, 2)
    with pytest.raises(RuntimeError, match=r"WrongSplit.forward_upper\(forward_lower\(x, 2\), 2\) does not reproduce"):
        cache.encode("text", encoder, torch.randn(3, 5), torch.arange(3))


def test_inputs_that_change_between_epochs_are_caught_by_verification():
    encoder = SplitTinyLayers()
    _freeze_below(encoder, 2)
    cache = ActivationCache()
    cache.activate("text", encoder, 2)
    cache.encode("text", encoder, torch.randn(3, 5), torch.arange(3))
    with pytest.raises(RuntimeError, match="cached 'text' activations of split 'train' differ from recomputed ones"):
        cache.encode("text", encoder, torch.randn(3, 5), torch.arange(3))  # "augmented": other inputs, same ids


def test_token_batches_are_stored_per_token_and_read_back_from_disk(minilm, tmp_path):
    encoder = copy.deepcopy(minilm)
    _freeze_below(encoder, 3)
    tokens = _inputs("minilm", encoder)
    lengths = tokens["attention_mask"].sum(1)
    first = ActivationCache(tmp_path)
    first.activate("text", encoder, 3)
    encoder.eval()
    with torch.no_grad():
        expected = first.encode("text", encoder, tokens, torch.tensor([7, 2, 9, 4]))
    store = first._stores[("train", "text")]
    assert store.used == int(lengths.sum()) and store.dim == 384  # the unmasked tokens only
    again = ActivationCache(tmp_path)
    again.activate("text", encoder, 3)
    with torch.no_grad():
        served = again.encode("text", encoder, tokens, torch.tensor([7, 2, 9, 4]))
    assert again.stats()["text"] == {"hits": 4, "misses": 0}
    torch.testing.assert_close(served, expected, rtol=1e-5, atol=1e-6)


def test_a_copied_model_gets_an_empty_cache():
    cache = ActivationCache()
    encoder = SplitTinyLayers()
    _freeze_below(encoder, 2)
    cache.activate("text", encoder, 2)
    assert copy.deepcopy(cache).active == [] and cache.splits == {"text": 2}
