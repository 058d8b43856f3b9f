"""The staged-finetuning plan without a Trainer: selectors resolved to parameters, the plan's checks and their
messages, each stage's param groups and LRs, the triggers, and the gated groups driven through the LR-driver protocol."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from ml_optim_plugins import Stage
from ml_optim_plugins.finetuning import FinetuningPlan, check_stages, gradual_unfreezing_stages, linear_probe_stages
from ml_optim_plugins.finetuning.lr_gating import BASE_LR_KEY, GatedParamGroups
from ml_optim_plugins.finetuning.plan import managed_selectors
from ml_optim_plugins.finetuning.stage import fresh_plateau, update_plateau
from ml_optim_plugins.multimodal.contract import modality_module_names
from ml_optim_plugins.schedules import LRDriver
from tests.finetuning.tiny import tiny_staged_model

IMAGE = ["encoders.image.stem.0.weight", "encoders.image.stem.0.bias", "encoders.image.stem.1.weight",
         "encoders.image.stem.1.bias", "encoders.image.block.0.weight", "encoders.image.block.0.bias",
         "encoders.image.block.1.weight", "encoders.image.block.1.bias"]
TEXT_BLOCKS = [  # encoder_blocks of TinyLayers: the embedding, each layer, the final norm joined to the last layer
    ["encoders.text.embed.weight", "encoders.text.embed.bias"],
    ["encoders.text.layers.0.0.weight", "encoders.text.layers.0.0.bias"],
    ["encoders.text.layers.1.0.weight", "encoders.text.layers.1.0.bias"],
    ["encoders.text.layers.2.0.weight", "encoders.text.layers.2.0.bias", "encoders.text.norm.weight",
     "encoders.text.norm.bias"],
]
HEAD = ["fusion.head.weight", "fusion.head.bias"]


def _resolve(stages, model=None, modules=None):
    model = model if model is not None else tiny_staged_model()
    modalities = modality_module_names(model)
    return model, FinetuningPlan.resolve(model, stages, managed_selectors(model, modules, modalities), modalities)


def _names(plan, ids):
    return sorted(plan.names[p] for p in ids)


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("image", IMAGE),
        ("text", [n for block in TEXT_BLOCKS for n in block]),
        ("text[-1]", TEXT_BLOCKS[-1]),
        ("text[-2:]", TEXT_BLOCKS[-2] + TEXT_BLOCKS[-1]),
        ("text[:1]", TEXT_BLOCKS[0]),
        ("image[0]", IMAGE[:4]),
        ("encoders.text.layers.1", TEXT_BLOCKS[2]),
        ("encoders.*.stem.1", IMAGE[2:4]),
    ],
)
def test_selectors_resolve_to_the_parameters_they_name(selector, expected):
    _, plan = _resolve([Stage(), Stage(start_epoch=1, trainable=[selector])])
    assert _names(plan, plan.trainable[1] - plan.trainable[0]) == sorted(expected)
    assert _names(plan, plan.trainable[0]) == sorted(HEAD)  # the probe: only what is not managed trains


def test_managed_modules_default_to_the_encoders_and_can_be_narrowed():
    _, plan = _resolve([Stage()])
    assert _names(plan, plan.managed) == sorted(IMAGE + [n for block in TEXT_BLOCKS for n in block])
    _, plan = _resolve([Stage(), Stage(start_epoch=1, trainable=["text[-1]"])], modules=["text[-2:]"])
    assert _names(plan, plan.managed) == sorted(TEXT_BLOCKS[-2] + TEXT_BLOCKS[-1])
    assert set(IMAGE) <= {plan.names[p] for p in plan.trainable[0]}  # unmanaged: trains in every stage


def test_train_bn_false_leaves_batchnorm_frozen():
    _, plan = _resolve([Stage(trainable=["image"], train_bn=False)])
    trained = {plan.names[p] for p in plan.trainable[0]}
    assert "encoders.image.stem.0.weight" in trained and "encoders.image.stem.1.weight" not in trained


@pytest.mark.parametrize(
    ("multipliers", "expected"),
    [
        ({"text": 0.5}, {"layers.2.0.weight": 0.5, "embed.weight": 0.5}),
        ({"text": 0.5, "text[-1]": 0.1}, {"layers.2.0.weight": 0.1, "norm.bias": 0.1, "embed.weight": 0.5}),
        ({"text[-1]": 0.1, "text": 0.5}, {"layers.2.0.weight": 0.1, "embed.weight": 0.5}),  # order does not matter
        ({"encoders.*": 0.2, "text[0]": 0.3}, {"embed.weight": 0.3, "layers.0.0.weight": 0.2}),
    ],
)
def test_the_narrowest_lr_multiplier_wins(multipliers, expected):
    model, plan = _resolve([Stage(), Stage(start_epoch=1, trainable=["text"], lr_multipliers=multipliers)])
    by_name = {name: id(p) for name, p in model.named_parameters()}
    got = {short: plan.multipliers[1].get(by_name[f"encoders.text.{short}"], 1.0) for short in expected}
    assert got == pytest.approx(expected)
    assert plan.base_lr(0.1, by_name["encoders.text.embed.weight"], 0) == 0.0  # frozen in the probe
    assert plan.base_lr(0.1, by_name["fusion.head.weight"], 1) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([], "StagedFinetuning needs at least one Stage"),
        ([Stage(start_epoch=2)], "the first stage starts with training; it cannot have a trigger"),
        ([Stage(monitor="val/loss")], "the first stage starts with training"),
        ([Stage(), Stage(trainable=["image"])], r"stage 1 \(unnamed\) has no trigger: give start_epoch, start_step"),
        ([Stage(), Stage(start_epoch=3), Stage(start_epoch=2)],
         r"stage 2 starts at epoch 2, before an earlier stage \(epoch 3\); stages run in order"),
        ([Stage(), Stage(start_step=30), Stage(start_step=10)], r"stage 2 starts at step 10, before an earlier stage"),
        ([Stage(name="a"), Stage(name="b", start_epoch=1), Stage(name="c", start_epoch=1)],
         r"stages 1 \(b\) and 2 \(c\) both start at epoch 1, so stage 1 never trains"),
    ],
)
def test_bad_plans_are_refused_with_what_to_change(stages, message):
    with pytest.raises(ValueError, match=message):
        check_stages(stages)


def test_stages_starting_together_on_different_units_are_allowed():
    check_stages([Stage(), Stage(start_epoch=1, start_step=50), Stage(start_epoch=1)])


@pytest.mark.parametrize(
    ("stages", "modules", "message"),
    [
        ([Stage(trainable=["fusion"])], None,
         r"stage 0 \(stage0\) makes trainable parameters that StagedFinetuning does not manage \(e.g. "
         r"\['fusion.head.bias', 'fusion.head.weight'\]\)"),
        ([Stage(trainable=["audio"])], None, r"selector 'audio' matches no parameter; give a modality \['image', "),
        ([Stage(trainable=["text[7]"])], None, r"block 7 out of range; encoders.text has 4 blocks"),
        ([Stage(), Stage(start_epoch=1, trainable=["image"])], ["text"], r"stage 1 \(stage1\) makes trainable"),
    ],
)
def test_selector_problems_name_the_stage_and_what_exists(stages, modules, message):
    with pytest.raises(ValueError, match=message):
        _resolve(stages, modules=modules)


def test_a_module_without_the_contract_needs_modules():
    with pytest.raises(ValueError, match="Linear has no modality contract .* modules=\\[...\\]"):
        managed_selectors(torch.nn.Linear(2, 2), None, {})
    assert managed_selectors(torch.nn.Linear(2, 2), ["weight"], {}) == ["weight"]


@pytest.mark.parametrize(
    ("check", "message"),
    [
        (lambda plan, model: plan.check_optimized({id(p) for p in model.fusion.parameters()}),
         r"parameters that a later stage trains are in no optimizer \(e.g. \['encoders.image.block.0.bias'"),
        (lambda plan, model: plan.check_validation(False), "a stage starts on a validation metric .* no validation"),
        (lambda plan, model: plan.check_refreeze(plan.trainable[1], find_unused_parameters=False),
         r"stage 2 \(all-but-image\) freezes parameters that DDP already synchronises \(e.g. "
         r"\['encoders.image.block.0.bias'"),
        (lambda plan, model: plan.check_lr_driver(0, "AdamW", driven=False, foreign_scheduler=True,
                                                  fast_dev_run=False),
         r"optimizer 0 \(AdamW\) has a LR scheduler from configure_optimizers"),
        (lambda plan, model: plan.check_lr_driver(0, "AdamW", driven=False, foreign_scheduler=False,
                                                  fast_dev_run=False),
         "a stage asks for warmup_steps, which needs ml_optim_plugins.WarmupDecay"),
        (lambda plan, model: plan.monitored_value(1, {"val/acc": torch.tensor(1.0)}),
         r"stage 1 \(stage1\) monitors 'val/loss', which was not logged; logged metrics: \['val/acc'\]"),
    ],
)
def test_checks_against_the_run_raise_with_their_messages(check, message):
    model, plan = _resolve([
        Stage(), Stage(monitor="val/loss", trainable=["image"], warmup_steps=3),
        Stage(name="all-but-image", start_epoch=5, trainable=["text"]),
    ])
    with pytest.raises(MisconfigurationException, match=message):
        check(plan, model)


def test_checks_that_pass_stay_silent():
    model, plan = _resolve([Stage(), Stage(start_epoch=1, trainable=["image"]),
                            Stage(start_epoch=2, trainable=["text"])])
    plan.check_optimized({id(p) for p in model.parameters()})
    plan.check_validation(False)  # no monitor stage
    plan.check_refreeze(plan.trainable[1], find_unused_parameters=True)
    plan.check_lr_driver(0, "AdamW", driven=False, foreign_scheduler=True, fast_dev_run=False)  # nothing to control


@pytest.mark.parametrize(
    ("max_epochs", "max_steps", "after", "expected"),
    [
        (2, -1, 0, "stage 1 (finetune) starts at epoch 2, but max_epochs=2 ends the run first, so it never runs and "
                   "['encoders.image.block.0', 'encoders.image.block.1', 'encoders.image.stem.0'] never train. "
                   "Raise max_epochs above 2"),
        (6, -1, 0, None),
        (None, 10, 0, None),  # no epoch limit
        (5, -1, 1, "stage 2 (stage2) starts at epoch 5"),
        (5, -1, 2, None),  # already in the last stage
    ],
)
def test_a_run_that_ends_before_a_stage_is_warned_about(max_epochs, max_steps, after, expected):
    _, plan = _resolve(linear_probe_stages(2, ["image"]) + [Stage(start_epoch=5, trainable=["image", "text"])])
    warning = plan.unreached_stage(max_epochs, max_steps, after=after)
    if expected is None:
        assert warning is None
    else:
        assert expected in warning


def test_a_frozen_randomly_initialised_encoder_is_warned_about():
    model = tiny_staged_model()
    model.encoders["image"].pretrained_weights = False
    model, plan = _resolve([Stage(), Stage(start_epoch=1, trainable=["image"])], model=model)
    warnings = plan.random_frozen_encoders(model)
    assert len(warnings) == 1 and warnings[0].startswith("StagedFinetuning freezes the 'image' encoder (TinyCNN)")
    _, plan = _resolve([Stage(trainable=["image"])], model=model)
    assert plan.random_frozen_encoders(model) == []  # it trains from the start


@pytest.mark.parametrize(
    ("stage", "epoch", "step", "at_epoch_start", "pending", "due"),
    [
        (Stage(start_epoch=2), 1, 50, True, False, False),
        (Stage(start_epoch=2), 2, 50, True, False, True),
        (Stage(start_epoch=2), 2, 50, False, False, False),  # mid-epoch: waits for the next epoch's start
        (Stage(start_epoch=2), 3, 50, False, False, True),
        (Stage(start_step=10), 0, 9, False, False, False),
        (Stage(start_step=10), 0, 10, False, False, True),
        (Stage(monitor="val/loss"), 9, 99, True, False, False),
        (Stage(monitor="val/loss"), 0, 0, False, True, True),
        (Stage(start_epoch=2), 0, 0, True, True, False),  # a pending plateau is not its trigger
    ],
)
def test_triggers(stage, epoch, step, at_epoch_start, pending, due):
    assert stage.is_due(epoch, step, at_epoch_start=at_epoch_start, plateau_pending=pending) is due


@pytest.mark.parametrize(
    ("mode", "min_delta", "values", "wait", "pending"),
    [
        ("min", 0.0, [1.0, 0.9, 0.8], 0, False),
        ("min", 0.0, [1.0, 0.9, 0.95, 0.92], 2, True),
        ("min", 0.1, [1.0, 0.95, 0.91], 2, True),  # improvements smaller than min_delta do not count
        ("max", 0.0, [0.5, 0.6, 0.6], 1, False),
        ("min", 0.0, [1.0, float("nan"), float("nan")], 2, True),  # NaN never improves
    ],
)
def test_plateau_counters(mode, min_delta, values, wait, pending):
    stage, state = Stage(monitor="m", mode=mode, min_delta=min_delta, patience=2), fresh_plateau()
    for value in values:
        state = update_plateau(state, stage, value)
    assert (state["wait"], state["pending"]) == (wait, pending)


def test_the_plan_counts_the_next_stages_plateau_only_when_that_stage_has_a_plateau_trigger():
    stages = [Stage(), Stage(trainable=["image"], monitor="val/loss", patience=1), Stage(start_epoch=5,
                                                                                      trainable=["text"])]
    _, plan = _resolve(stages)
    state = plan.plateau_after_validation(1, fresh_plateau(), {"val/loss": torch.tensor(1.0)})
    assert state == {"best": 1.0, "wait": 0, "pending": False}
    assert plan.plateau_after_validation(1, state, {"val/loss": torch.tensor(1.5)})["pending"]
    assert plan.plateau_after_validation(2, state, {"val/loss": torch.tensor(1.5)}) is None  # an epoch trigger
    assert plan.plateau_after_validation(3, state, {}) is None  # no next stage
    with pytest.raises(MisconfigurationException, match="monitors 'val/loss', which was not logged"):
        plan.plateau_after_validation(1, state, {"val/acc": torch.tensor(1.0)})


def test_gradual_unfreezing_stages_follow_the_blocks_of_each_encoder():
    model = tiny_staged_model()
    stages = gradual_unfreezing_stages(model, ["image", "text"], modality_module_names(model), factor=2.0,
                                       epochs_per_stage=2, max_blocks=3)
    assert [(s.name, s.start_epoch, s.trainable) for s in stages] == [
        ("probe", None, []), ("top1", 2, ["image[-1:]", "text[-1:]"]), ("top2", 4, ["image[-2:]", "text[-2:]"]),
        ("top3", 6, ["image[-2:]", "text[-3:]"]),  # the image encoder has two blocks only
    ]
    assert stages[3].lr_multipliers == {"image[-1]": 1.0, "image[-2]": 0.5, "text[-1]": 1.0, "text[-2]": 0.5,
                                        "text[-3]": 0.25}
    with pytest.raises(ValueError, match="'text\\[-1\\]' selects blocks already"):
        gradual_unfreezing_stages(model, ["text[-1]"], modality_module_names(model))


class RecordingDriver:
    """An LR driver that records what the stages ask of it (and refuses base LRs under ``floor``)."""

    def __init__(self, floor=0.0):
        self.calls, self.floor = [], floor

    def drives(self, trainer, optimizer_index):
        return True

    def check_base_lr(self, optimizer_index, group_index, base_lr):
        if 0 < base_lr < self.floor:
            raise ValueError(f"base LR {base_lr:g} is below min_lr {self.floor:g}")
        return base_lr

    def set_base_lr(self, optimizer_index, group_index, base_lr):
        self.calls.append(("set", group_index, round(base_lr, 6)))

    def restart_warmup(self, optimizer_index, group_index, warmup_steps=None, base_lr=None):
        self.calls.append(("warmup", group_index, warmup_steps, round(base_lr, 6)))


def _gated(driver=None, scheduled=False):
    model, plan = _resolve([
        Stage(name="probe"),
        Stage(name="top", start_epoch=1, trainable=["image", "text[-1]"], warmup_steps=4,
              lr_multipliers={"text": 0.5}),
        Stage(name="all", start_epoch=2, trainable=["image", "text"], lr_multipliers={"text": 0.1}),
    ])
    optimizer = model.configure_optimizers()  # AdamW, lr 0.05, one named group per encoder and the fusion
    groups = GatedParamGroups(plan, [optimizer], [driver], {id(optimizer)} if scheduled else set())
    return plan, optimizer, groups


def test_groups_are_split_by_stage_plan_and_named_after_the_stage_they_start_in():
    plan, optimizer, groups = _gated()
    groups.prepare(fast_dev_run=True)  # fast_dev_run: the warmup needs no driver
    assert [g["name"] for g in optimizer.param_groups] == [
        "encoders.image", "encoders.text/all", "encoders.text/top", "fusion"]
    assert all(g[BASE_LR_KEY] == 0.05 for g in optimizer.param_groups)
    text_all = optimizer.param_groups[1]
    assert sorted(plan.names[id(p)] for p in text_all["params"]) == sorted(TEXT_BLOCKS[0] + TEXT_BLOCKS[1]
                                                                           + TEXT_BLOCKS[2])


@pytest.mark.parametrize(
    ("index", "lrs"),
    [
        (0, [0.0, 0.0, 0.0, 0.05]),
        (1, [0.05, 0.0, 0.025, 0.05]),
        (2, [0.05, 0.005, 0.005, 0.05]),
    ],
)
def test_each_stage_sets_its_base_lrs_without_a_driver(index, lrs):
    _, optimizer, groups = _gated()
    groups.prepare(fast_dev_run=True)
    groups.enter(index, previous=frozenset(), initial=False)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(lrs)


def test_with_a_driver_newly_trainable_groups_get_a_warmup_and_the_others_a_new_base_lr():
    driver = RecordingDriver()
    plan, optimizer, groups = _gated(driver)
    groups.prepare(fast_dev_run=False)
    groups.enter(0, previous=plan.trainable[0], initial=True)  # at fit start: in the groups, for the driver to read
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.0, 0.0, 0.0, 0.05]) and not driver.calls
    groups.enter(1, previous=plan.trainable[0], initial=False)
    assert driver.calls == [("warmup", 0, 4, 0.05), ("set", 1, 0.0), ("warmup", 2, 4, 0.025), ("set", 3, 0.05)]
    driver.calls.clear()
    groups.enter(2, previous=plan.trainable[1], initial=False)
    assert driver.calls == [("set", 0, 0.05), ("warmup", 1, None, 0.005), ("set", 2, 0.005), ("set", 3, 0.05)]


def test_the_driver_checks_every_stage_base_lr_and_the_error_names_the_stage():
    _, _, groups = _gated(RecordingDriver(floor=0.01))
    groups.prepare(fast_dev_run=False)
    with pytest.raises(ValueError, match=r"stage 2 \(all\): base LR 0.005 is below min_lr 0.01"):
        groups.check_base_lrs()
    _, _, groups = _gated(RecordingDriver(floor=0.001))
    groups.prepare(fast_dev_run=False)
    groups.check_base_lrs()


def test_a_foreign_scheduler_keeps_its_groups_and_lrs():
    _, optimizer, groups = _gated(scheduled=True)
    with pytest.raises(MisconfigurationException, match="has a LR scheduler from configure_optimizers"):
        groups.prepare(fast_dev_run=False)  # the plan sets multipliers and a warmup
    model, plan = _resolve([Stage(), Stage(start_epoch=1, trainable=["image"])])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    groups = GatedParamGroups(plan, [optimizer], [None], {id(optimizer)})
    groups.prepare(fast_dev_run=False)
    groups.enter(1, previous=plan.trainable[0], initial=False)
    assert len(optimizer.param_groups) == 1 and optimizer.param_groups[0]["lr"] == 0.1
    assert optimizer.param_groups[0]["name"] == "pg1" and BASE_LR_KEY not in optimizer.param_groups[0]


def test_the_recording_driver_and_warmup_decay_satisfy_the_protocol():
    from ml_optim_plugins import WarmupDecay

    assert isinstance(RecordingDriver(), LRDriver) and isinstance(WarmupDecay(warmup_steps=1), LRDriver)
    assert not isinstance(object(), LRDriver)
