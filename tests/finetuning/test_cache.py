"""FeatureCache: hits and misses, partial batches, invalidation, verification, disk storage; and in training:
frozen-stage epochs after the first skip the frozen encoders, with the same result as without the cache."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ml_optim_plugins import LinearProbeFinetune
from ml_optim_plugins.finetuning import FeatureCache
from tests.finetuning.tiny import loader, samples, tiny_staged_model, trainer


@pytest.fixture
def encoder():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh()).eval().requires_grad_(False)


@pytest.mark.parametrize("on_disk", [False, True])
def test_hits_misses_and_partial_batches(encoder, tmp_path, on_disk):
    cache = FeatureCache(tmp_path / "cache" if on_disk else None)
    cache.activate("x", encoder)
    x = torch.randn(6, 3)
    first = cache.encode("x", encoder, x[:4], torch.tensor([0, 1, 2, 3]))
    mixed = cache.encode("x", encoder, x[2:], torch.tensor([2, 3, 40, 41]))  # two cached, two new (and growth)
    assert torch.allclose(first, encoder(x[:4])) and torch.allclose(mixed, encoder(x[2:]))
    assert cache.stats()["x"] == {"hits": 2, "misses": 6}
    assert cache.filled("x") == 6
    again = cache.encode("x", encoder, x[2:], torch.tensor([2, 3, 40, 41]))
    assert torch.equal(again, mixed.float()) and cache.stats()["x"] == {"hits": 6, "misses": 6}


def test_splits_are_separate_and_invalidate_drops_everything(encoder):
    cache = FeatureCache()
    cache.activate("x", encoder)
    ids, x = torch.arange(3), torch.randn(3, 3)
    cache.encode("x", encoder, x, ids)
    cache.split = "val"
    cache.encode("x", encoder, x, ids)
    assert cache.stats()["x"]["misses"] == 6  # same ids, other split
    cache.invalidate("x")
    assert not cache.is_active("x") and cache.filled("x", "train") == 0
    with pytest.raises(RuntimeError, match="not active"):
        cache.encode("x", encoder, x, ids)


def test_verification_catches_features_that_change(encoder):
    noisy = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5)).train()  # dropout on: not deterministic
    cache = FeatureCache()
    cache.activate("x", noisy)
    x, ids = torch.randn(8, 3), torch.arange(8)
    cache.encode("x", noisy, x, ids)
    with pytest.raises(RuntimeError, match="differ from recomputed ones"):
        cache.encode("x", noisy, x, ids)
    unchecked = FeatureCache(verify=False)
    unchecked.activate("x", noisy)
    unchecked.encode("x", noisy, x, ids)
    unchecked.encode("x", noisy, x, ids)


def test_disk_cache_is_reused_only_for_the_same_weights(encoder, tmp_path):
    x, ids = torch.randn(5, 3), torch.arange(5)
    first = FeatureCache(tmp_path)
    first.activate("x", encoder)
    first.encode("x", encoder, x, ids)
    reopened = FeatureCache(tmp_path)
    reopened.activate("x", encoder)
    reopened.encode("x", encoder, x, ids)
    assert reopened.stats()["x"] == {"hits": 5, "misses": 0}
    changed = copy.deepcopy(encoder)
    changed[0].weight.data += 1
    third = FeatureCache(tmp_path)
    third.activate("x", changed)
    out = third.encode("x", changed, x, ids)
    assert third.stats()["x"] == {"hits": 0, "misses": 5} and torch.allclose(out, changed(x))


def test_a_copied_module_gets_an_empty_cache(encoder):
    cache = FeatureCache()
    cache.activate("x", encoder)
    assert copy.deepcopy(cache).active == []


class Counter:
    def __init__(self, module):
        self.calls = []
        module.register_forward_hook(lambda m, args, out: self.calls.append(args[0].shape[0]))


def _fit(cache_features, epochs=3):
    model = tiny_staged_model()
    image, text = Counter(model.encoders.image), Counter(model.encoders.text)
    plan = LinearProbeFinetune(probe_epochs=2, cache_features=cache_features)
    trainer(max_epochs=epochs, callbacks=[plan]).fit(model, loader(shuffle=False), loader(n=16))
    return model, plan, image, text


def test_frozen_epochs_after_the_first_skip_the_encoders_and_train_the_same():
    cached, plan, image, text = _fit(True)
    # Epoch 0: 6 train + 2 val batches computed; epoch 1: one verification batch per split; epoch 2: unfrozen.
    assert len(image.calls) == 8 + 2 + 8 and len(text.calls) == 8 + 2 + 8
    assert not plan.cache.is_active("image") and plan.cache.stats()["image"] == {"hits": 64, "misses": 64}
    reference, _, image_ref, _ = _fit(False)
    assert len(image_ref.calls) == 24
    for (name, a), b in zip(cached.state_dict().items(), reference.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert cached.feature_cache is None  # detached at teardown


def test_cached_batches_need_sample_ids():
    model = tiny_staged_model()
    data = [{k: v for k, v in s.items() if k != "index"} for s in samples()]
    with pytest.raises(KeyError, match="no sample ids under 'index'"):
        trainer(max_epochs=1, callbacks=[LinearProbeFinetune(cache_features=True)]).fit(
            model, torch.utils.data.DataLoader(data, batch_size=8))


def test_disk_rows_from_other_data_are_caught_by_verification(encoder, tmp_path):
    first = FeatureCache(tmp_path)
    first.activate("x", encoder)
    first.encode("x", encoder, torch.randn(4, 3), torch.arange(4))
    other = FeatureCache(tmp_path)  # same weights, same ids, other inputs: partly cached batch
    other.activate("x", encoder)
    with pytest.raises(RuntimeError, match="differ from recomputed ones"):
        other.encode("x", encoder, torch.randn(6, 3), torch.arange(6))


def test_fingerprints_cover_batchnorm_buffers():
    from ml_optim_plugins.finetuning import module_fingerprint
    from tests.finetuning.tiny import TinyCNN

    torch.manual_seed(0)
    a = TinyCNN()
    b = copy.deepcopy(a)
    assert module_fingerprint(a) == module_fingerprint(b)
    b.stem[1].running_mean += 1
    assert module_fingerprint(a) != module_fingerprint(b)


def test_files_of_an_older_layout_are_deleted_not_reopened(encoder, tmp_path):
    import json

    import numpy as np

    from ml_optim_plugins.finetuning import module_fingerprint

    old = tmp_path / "x" / "train"
    old.mkdir(parents=True)
    np.save(old / "values-64.npy", np.ones((64, 4), np.float32))  # one row per sample, no start / length files
    (tmp_path / "index.json").write_text(json.dumps({"x": module_fingerprint(encoder)}))
    cache = FeatureCache(tmp_path)
    cache.activate("x", encoder)
    x, ids = torch.randn(5, 3), torch.arange(5)
    assert torch.allclose(cache.encode("x", encoder, x, ids), encoder(x))
    assert cache.stats()["x"] == {"hits": 0, "misses": 5} and not (old / "values-64.npy").exists()
