"""The parts StagedFinetuning delegates to, without a Trainer: its caches (StageCaches), the averaging of the
gradients DDP did not register (UnregisteredGradients), the frozen set (FrozenModules) and the fit-start checks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from ml_optim_plugins import Stage
from ml_optim_plugins.finetuning import FinetuningPlan
from ml_optim_plugins.finetuning.ddp import UnregisteredGradients
from ml_optim_plugins.finetuning.fit_checks import check_fit_start
from ml_optim_plugins.finetuning.freeze import FrozenModules
from ml_optim_plugins.finetuning.plan import managed_selectors
from ml_optim_plugins.finetuning.stage_caches import StageCaches
from ml_optim_plugins.multimodal.contract import modality_module_names
from tests.finetuning.tiny import tiny_staged_model

RUN = SimpleNamespace(global_rank=1, datamodule=None)  # what StageCaches.setup reads of a Trainer


def _plan(model, *stages):
    modalities = modality_module_names(model)
    return FinetuningPlan.resolve(model, list(stages), managed_selectors(model, None, modalities), modalities)


def test_the_feature_cache_is_handed_to_the_module_follows_the_frozen_set_and_is_taken_back(tmp_path):
    model = tiny_staged_model()
    plan = _plan(model, Stage(), Stage(start_epoch=1, trainable=["text"]))
    caches = StageCaches(features=True, activations=False, directory=tmp_path)
    caches.setup(RUN, model, plan)
    assert model.feature_cache is caches.features and caches.activations is None
    assert caches.features.directory == tmp_path / "rank1"

    assert caches.follow(model, plan.trainable[0]) == []  # no activation cache: no lower blocks to keep in eval
    assert sorted(caches.features.active) == ["image", "text"]
    caches.follow(model, plan.trainable[1])
    assert caches.features.active == ["image"]  # the text encoder trains now: its features change every step

    caches.set_split("val", dataloader_idx=1)
    assert caches.features.split == "val1"
    assert caches.state_dict() == {"cache": {"active": ["image"], "stats": caches.features.stats()},
                                   "activation_cache": None}
    assert caches.describe() == ""
    caches.teardown(model)
    assert model.feature_cache is None


def test_caches_a_module_cannot_serve_are_refused_at_setup():
    plain = torch.nn.Linear(2, 2)
    model = tiny_staged_model()
    with pytest.raises(MisconfigurationException, match="cache_features=True.*Linear has not"):
        StageCaches(features=True, activations=False).setup(RUN, plain, _plan(model, Stage()))
    partly = _plan(model, Stage(trainable=["image[-1]"]))  # TinyCNN cannot be split at a block boundary
    refused = r"stage 0 \(stage0\) trains only part of an encoder.*TinyCNN cannot be split"
    with pytest.raises(MisconfigurationException, match=refused):
        StageCaches(features=False, activations=True).setup(RUN, model, partly)
    assert model.activation_cache is None  # nothing handed over after a refusal


def _gradients(model, plan):
    unregistered = UnregisteredGradients()
    unregistered.registered = set(plan.trainable[0])  # what DDP would have registered at wrapping
    unregistered.follow(plan, plan.trainable[1])
    calls = []
    unregistered.sync = lambda trainer, params: calls.append([plan.names[id(p)] for p in params])
    return unregistered, calls


def test_only_parameters_unfrozen_after_wrapping_are_averaged_by_hand():
    model = tiny_staged_model()
    plan = _plan(model, Stage(trainable=["image"]), Stage(start_epoch=1, trainable=["image", "text[-1]"]))
    unregistered, calls = _gradients(model, plan)
    assert [plan.names[id(p)] for p in unregistered.params] == [  # in name order, the same on every rank
        "encoders.text.layers.2.0.bias", "encoders.text.layers.2.0.weight", "encoders.text.norm.bias",
        "encoders.text.norm.weight"]

    trainer = SimpleNamespace(strategy=SimpleNamespace(model=model))  # no DDP wrapper: never an accumulation pass
    unregistered.after_backward(trainer, SimpleNamespace(automatic_optimization=True))
    assert calls == [[plan.names[id(p)] for p in unregistered.params]]

    # Manual optimization: nothing after backward; before each optimizer's step, its own parameters only.
    manual = SimpleNamespace(automatic_optimization=False)
    unregistered.after_backward(trainer, manual)
    text_norm = torch.optim.SGD(model.encoders["text"].norm.parameters(), lr=0.1)
    unregistered.before_optimizer_step(trainer, manual, text_norm)
    assert calls[1:] == [["encoders.text.norm.bias", "encoders.text.norm.weight"]]


def test_without_ddp_nothing_is_averaged():
    model = tiny_staged_model()
    plan = _plan(model, Stage(), Stage(start_epoch=1, trainable=["text"]))
    unregistered = UnregisteredGradients()
    unregistered.attach(SimpleNamespace(model=model), plan)
    unregistered.follow(plan, plan.trainable[1])
    assert unregistered.registered is None and unregistered.params == []


@pytest.mark.parametrize("model_training", [True, False])
def test_the_frozen_set_freezes_keeps_in_eval_and_hands_unfrozen_modules_back_to_the_models_mode(model_training):
    model = tiny_staged_model()
    plan = _plan(model, Stage(), Stage(start_epoch=1, trainable=["text"]))
    names = modality_module_names(model)
    image, text = model.get_submodule(names["image"]), model.get_submodule(names["text"])
    extra = torch.nn.Dropout()  # e.g. an activation cache's parameter-free lower block
    frozen = FrozenModules()
    frozen.apply(model, plan.params, plan.managed, plan.trainable[0], set_modes=False)
    assert not any(p.requires_grad for p in [*image.parameters(), *text.parameters()])
    assert text.training and frozen.modules == [model.encoders]  # the largest frozen module; modes left as they are

    frozen.apply(model, plan.params, plan.managed, plan.trainable[0], extra=[extra])
    assert not image.training and not text.training and not extra.training
    model.train(model_training)  # Lightning switches modes at each epoch start and around validation
    frozen.keep_in_eval()
    assert not image.training and not text.training and not extra.training and model.fusion.training is model_training

    frozen.apply(model, plan.params, plan.managed, plan.trainable[1])
    assert all(p.requires_grad for p in text.parameters()) and not any(p.requires_grad for p in image.parameters())
    assert frozen.modules == [image] and not image.training
    assert text.training is model_training and extra.training is model_training  # back to the model's mode


@pytest.mark.parametrize(
    "strategy",
    [
        lambda: FSDPStrategy(),
        lambda: ModelParallelStrategy(),
        lambda: DeepSpeedStrategy.__new__(DeepSpeedStrategy),  # its __init__ needs deepspeed installed
        lambda: type("MyFSDPFork", (FSDPStrategy,), {})(),  # a subclass, whatever its name
    ],
)
def test_sharding_strategies_are_refused_at_fit_start_by_type(strategy):
    # These strategies need an accelerator (FSDP refuses a CPU Trainer), so the check gets a stand-in trainer.
    strategy, model = strategy(), tiny_staged_model()
    with pytest.raises(MisconfigurationException, match=f"does not support {type(strategy).__name__} .it shards"):
        check_fit_start(SimpleNamespace(strategy=strategy), model, _plan(model, Stage()), stage=0)
