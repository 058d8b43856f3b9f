"""Stage and plan validation: bad values fail at construction, naming them."""

from __future__ import annotations

import pytest

from ml_optim_plugins import GradualUnfreezing, LinearProbeFinetune, Stage, StagedFinetuning


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"start_epoch": -1}, "start_epoch=-1"),
        ({"start_step": 1.5}, "start_step=1.5"),
        ({"warmup_steps": -3}, "warmup_steps=-3"),
        ({"patience": 0}, "Stage patience must be an integer >= 1, got 0"),
        ({"mode": "up"}, "mode='up'"),
        ({"min_delta": -0.1}, "Stage min_delta must be a finite number >= 0, got -0.1"),
        ({"lr_multipliers": {"text": -1.0}}, "Stage lr_multipliers['text'] must be a finite number >= 0"),
    ],
)
def test_bad_stage_values(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        Stage(**kwargs)


def test_a_single_selector_string_becomes_a_list():
    assert Stage(trainable="image").trainable == ["image"]


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([], "at least one Stage"),
        ([Stage(start_epoch=2)], "first stage starts with training"),
        ([Stage(), Stage(trainable=["image"])], "stage 1 .* has no trigger"),
        ([Stage(), Stage(start_epoch=3), Stage(start_epoch=2)], "stage 2 starts at epoch 2, before"),
        ([Stage(), Stage(start_step=30), Stage(start_step=10)], "stage 2 starts at step 10, before"),
    ],
)
def test_bad_plans(stages, message):
    with pytest.raises(ValueError, match=message):
        StagedFinetuning(stages)


def test_stages_from_mappings_as_a_config_gives_them():
    callback = StagedFinetuning([{"name": "probe"}, {"start_epoch": 1, "trainable": ["image"]}])
    assert [s.name for s in callback.stages] == ["probe", None]
    assert callback.stages[1] == Stage(start_epoch=1, trainable=["image"])


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (LinearProbeFinetune, {"probe_epochs": 0}, "probe_epochs=0"),
        (GradualUnfreezing, {"epochs_per_stage": 0}, "epochs_per_stage=0"),
        (GradualUnfreezing, {"factor": 0.5}, "slowly.* must be a finite number >= 1, got 0.5"),
        (GradualUnfreezing, {"max_blocks": 0}, "max_blocks=0"),
    ],
)
def test_bad_plan_arguments(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)
