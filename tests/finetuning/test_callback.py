"""StagedFinetuning: frozen stays frozen (no grads, eval mode), unfreezing trains, LRs and warmups per stage,
triggers by epoch, step and plateau, plans, and clear errors."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from ml_optim_plugins import GradualUnfreezing, LinearProbeFinetune, Stage, StagedFinetuning, WarmupDecay
from tests.finetuning.tiny import loader, tiny_staged_model, trainer


class Recorder(pl.Callback):
    """Per training batch: modes of the encoders' submodules, which parameters have gradients, and the LRs."""

    def __init__(self):
        self.rows = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.rows.append({
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "training": {n: m.training for n, m in pl_module.named_modules() if n.startswith("encoders.")},
            "grads": {n for n, p in pl_module.named_parameters() if p.grad is not None},
            "lrs": {g["name"]: g["lr"] for g in optimizer.param_groups},
        })


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(before, model, prefix):
    return {k for k, v in model.state_dict().items() if k.startswith(prefix) and not torch.equal(v, before[k])}


def test_frozen_encoders_stay_in_eval_get_no_gradients_and_do_not_change():
    model, recorder = tiny_staged_model(), Recorder()
    before = _snapshot(model)
    trainer(max_epochs=2, callbacks=[StagedFinetuning([Stage()]), recorder]).fit(model, loader())
    assert len(recorder.rows) == 12
    for row in recorder.rows:
        assert not any(row["training"].values())  # BatchNorm and dropout of frozen encoders in eval
        assert row["grads"] and all(name.startswith("fusion.") for name in row["grads"])
    assert not _changed(before, model, "encoders.")  # weights and BatchNorm statistics
    assert _changed(before, model, "fusion.head")


def test_unfreezing_trains_and_restores_train_mode():
    model, recorder = tiny_staged_model(), Recorder()
    before = _snapshot(model)
    plan = StagedFinetuning([Stage(), Stage(start_epoch=1, trainable=["image", "text[-1]"])])
    trainer(max_epochs=2, callbacks=[plan, recorder]).fit(model, loader())
    first, later = recorder.rows[:6], recorder.rows[6:]
    assert not any(first[0]["training"].values())
    assert all(later[0]["training"][n] for n in ("encoders.image", "encoders.image.block.1", "encoders.text.norm",
                                                 "encoders.text.layers.2.2"))
    assert not later[0]["training"]["encoders.text.layers.0"]  # still frozen
    assert "encoders.image.block.0.weight" in later[0]["grads"]
    assert "encoders.text.layers.1.0.weight" not in later[0]["grads"]
    changed = _changed(before, model, "encoders.")
    assert "encoders.image.stem.1.running_mean" in changed and "encoders.text.layers.2.0.weight" in changed
    assert not any(k.startswith(("encoders.text.embed", "encoders.text.layers.0", "encoders.text.layers.1"))
                   for k in changed)
    assert [(b["stage"], b["epoch"], b["step"]) for b in plan.boundaries] == [(0, 0, 0), (1, 1, 6)]


def test_train_bn_false_keeps_batchnorm_frozen_in_trainable_modules():
    model, recorder = tiny_staged_model(), Recorder()
    before = _snapshot(model)
    plan = StagedFinetuning([Stage(trainable=["image"], train_bn=False)])
    trainer(max_epochs=1, callbacks=[plan, recorder]).fit(model, loader())
    row = recorder.rows[0]
    assert row["training"]["encoders.image.stem.0"] and not row["training"]["encoders.image.stem.1"]
    changed = _changed(before, model, "encoders.image")
    assert "encoders.image.stem.0.weight" in changed
    assert not any(".stem.1." in k or ".block.1." in k for k in changed)


def test_groups_are_split_named_and_gated_with_warmup_for_unfrozen_ones():
    model, recorder = tiny_staged_model(lr=0.1), Recorder()
    plan = StagedFinetuning([
        Stage(),
        Stage(start_step=4, trainable=["image", "text[-2:]"], lr_multipliers={"text[-1]": 0.5, "text[-2]": 0.25},
              warmup_steps=4),
    ])
    # WarmupDecay listed first: StagedFinetuning moves itself ahead so it splits the groups before they are registered.
    trainer(max_epochs=2, callbacks=[WarmupDecay(warmup_steps=2, decay="constant"), plan, recorder]).fit(model, loader())
    names = list(recorder.rows[0]["lrs"])
    assert names == ["encoders.image", "encoders.text/frozen", "encoders.text/stage1x0.25", "encoders.text/stage1x0.5",
                     "fusion"]
    lrs = [row["lrs"] for row in recorder.rows]
    assert [r["fusion"] for r in lrs[:3]] == pytest.approx([0.0, 0.05, 0.1])  # global linear warmup of 2 steps
    assert all(r[n] == 0 for r in lrs[:4] for n in names[:4])  # gated while frozen
    # From step 4: its own linear warmup of 4 steps (the same shape as the global one), times the multiplier.
    image = [r["encoders.image"] for r in lrs[4:9]]
    assert image == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1])
    assert [r["encoders.text/stage1x0.5"] for r in lrs[4:9]] == pytest.approx([x * 0.5 for x in image])
    assert [r["encoders.text/stage1x0.25"] for r in lrs[4:9]] == pytest.approx([x * 0.25 for x in image])
    assert all(r["encoders.text/frozen"] == 0 for r in lrs)


def test_without_a_scheduler_the_stage_sets_the_lrs():
    model, recorder = tiny_staged_model(lr=0.1), Recorder()
    plan = StagedFinetuning([Stage(), Stage(start_epoch=1, trainable=["text"], lr_multipliers={"text": 0.3})])
    trainer(max_epochs=2, callbacks=[plan, recorder]).fit(model, loader())
    assert recorder.rows[0]["lrs"]["encoders.text"] == 0 and recorder.rows[0]["lrs"]["fusion"] == 0.1
    assert recorder.rows[-1]["lrs"]["encoders.text"] == pytest.approx(0.03)
    assert recorder.rows[-1]["lrs"]["encoders.image"] == 0


class LogMetric(pl.Callback):
    """Logs ``values[epoch]`` as the validation metric ``val/score``."""

    def __init__(self, values):
        self.values = values

    def on_validation_epoch_end(self, trainer, pl_module):
        pl_module.log("val/score", float(self.values[trainer.current_epoch]))


def test_plateau_trigger_starts_the_next_stage_after_patience():
    model = tiny_staged_model()
    plan = StagedFinetuning([Stage(), Stage(monitor="val/score", mode="max", patience=2, trainable=["image"])])
    trainer(max_epochs=6, callbacks=[plan, LogMetric([0, 1, 1, 1, 1, 1])]).fit(model, loader(), loader(n=16))
    # Best at epoch 1; epochs 2 and 3 do not improve: the stage starts with epoch 4's first batch.
    assert [(b["stage"], b["epoch"]) for b in plan.boundaries] == [(0, 0), (1, 4)]


@pytest.mark.parametrize("reset, last_epoch", [(True, 3), (False, 2)])
def test_a_new_stage_gets_the_full_patience_of_early_stopping(reset, last_epoch):
    from lightning.pytorch.callbacks import EarlyStopping

    model, recorder = tiny_staged_model(), Recorder()
    plan = LinearProbeFinetune(probe_epochs=2, reset_early_stopping=reset)
    stopper = EarlyStopping(monitor="val/score", mode="max", patience=2)
    # Best at epoch 0, no improvement after: patience runs out after epoch 2, or after epoch 3 when the finetune
    # stage (from epoch 2) starts counting anew.
    callbacks = [plan, LogMetric([1, 0, 0, 0, 0, 0]), stopper, recorder]
    trainer(max_epochs=6, callbacks=callbacks).fit(model, loader(), loader(n=16))
    assert max(row["epoch"] for row in recorder.rows) == last_epoch
    assert float(stopper.best_score) == 1.0


def test_a_monitor_that_is_never_logged_is_an_error_naming_the_logged_ones():
    plan = StagedFinetuning([Stage(), Stage(monitor="val/nope", trainable=["image"])])
    with pytest.raises(MisconfigurationException, match="monitors 'val/nope', which was not logged; logged metrics"):
        trainer(max_epochs=2, callbacks=[plan]).fit(tiny_staged_model(), loader(), loader(n=16))


def test_step_triggers_wait_for_the_start_of_an_accumulation_window():
    model, recorder = tiny_staged_model(), Recorder()
    plan = StagedFinetuning([Stage(), Stage(start_step=1, trainable=["image"])])
    trainer(max_epochs=1, accumulate_grad_batches=2, callbacks=[plan, recorder]).fit(model, loader())
    assert [(b["stage"], b["step"]) for b in plan.boundaries] == [(0, 0), (1, 1)]
    assert "encoders.image.stem.0.weight" not in recorder.rows[0]["grads"]
    assert "encoders.image.stem.0.weight" in recorder.rows[1]["grads"]


def test_linear_probe_then_finetune_unfreezes_every_encoder():
    model, recorder = tiny_staged_model(), Recorder()
    plan = LinearProbeFinetune(probe_epochs=1, lr_multipliers={"text": 0.5})
    trainer(max_epochs=2, callbacks=[plan, recorder]).fit(model, loader())
    assert plan.stage_name() == "finetune"
    assert {"encoders.image.stem.0.weight", "encoders.text.embed.weight"} <= recorder.rows[-1]["grads"]
    assert recorder.rows[-1]["lrs"]["encoders.text"] == pytest.approx(0.5 * recorder.rows[-1]["lrs"]["encoders.image"])


def test_gradual_unfreezing_unfreezes_top_down_with_discriminative_lrs():
    model, recorder = tiny_staged_model(lr=0.1), Recorder()
    plan = GradualUnfreezing(epochs_per_stage=1, factor=2.0)
    trainer(max_epochs=5, callbacks=[plan, recorder]).fit(model, loader())
    assert [s.trainable for s in plan._plan] == [
        [], ["image[-1:]", "text[-1:]"], ["image[-2:]", "text[-2:]"], ["image[-2:]", "text[-3:]"],
        ["image[-2:]", "text[-4:]"],
    ]
    grads = [row["grads"] for row in recorder.rows[::6]]
    assert "encoders.text.layers.2.0.weight" in grads[1] and "encoders.text.layers.1.0.weight" not in grads[1]
    assert "encoders.text.embed.weight" in grads[4] and "encoders.text.embed.weight" not in grads[3]
    last = recorder.rows[-1]["lrs"]
    by_block = {name: lr for name, lr in last.items() if name.startswith("encoders.text")}
    assert sorted(by_block.values(), reverse=True) == pytest.approx([0.1, 0.05, 0.025, 0.0125])


@pytest.mark.parametrize(
    ("callbacks", "configure", "error", "message"),
    [
        (lambda: [StagedFinetuning([Stage(), Stage(start_epoch=1, trainable=["image"], warmup_steps=3)])], None,
         MisconfigurationException, "needs ml_optim_plugins.WarmupDecay"),
        (lambda: [StagedFinetuning([Stage(), Stage(start_epoch=1, trainable=["image"],
                                                   lr_multipliers={"image": 0.1})])], "scheduler",
         MisconfigurationException, "has a LR scheduler from configure_optimizers"),
        (lambda: [StagedFinetuning([Stage(trainable=["fusion"])])], None, ValueError,
         "does not manage .*fusion.head"),
        (lambda: [StagedFinetuning([Stage(trainable=["audio"])])], None, ValueError, "'audio' matches no parameter"),
        (lambda: [StagedFinetuning([Stage()], cache_features=True)], "plain", MisconfigurationException,
         "needs a module that encodes through encode_modality"),
    ],
)
def test_clear_errors_before_the_first_step(callbacks, configure, error, message):
    model = tiny_staged_model()
    if configure == "scheduler":
        model.scheduler_factory = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    if configure == "plain":
        model.encode_modality = None
    with pytest.raises(error, match=message):
        trainer(max_epochs=1, callbacks=callbacks()).fit(model, loader())
    assert model.global_step == 0


class Plain(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.body, self.head = torch.nn.Linear(5, 4), torch.nn.Linear(4, 3)

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self.head(self.body(batch["text"])), batch["label"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_module_without_the_contract_needs_modules_and_then_works():
    with pytest.raises(ValueError, match="has no modality contract"):
        trainer(max_epochs=1, callbacks=[StagedFinetuning([Stage()])]).fit(Plain(), loader())
    model = Plain()
    before = model.body.weight.detach().clone()
    plan = StagedFinetuning([Stage(), Stage(start_step=3, trainable=["body"])], modules=["body"])
    trainer(max_steps=3, callbacks=[plan]).fit(model, loader())
    assert torch.equal(model.body.weight, before)
    trainer(max_steps=6, callbacks=[plan]).fit(model, loader())
    assert not torch.equal(model.body.weight, before)


@pytest.mark.parametrize("method", ["ogm_ge", "agm", "mmpareto"])
def test_works_with_balancing_and_gradient_monitoring(method):
    from ml_optim_plugins import GradientMonitor, ModalityBalancer

    model = tiny_staged_model(aux_loss_weight=1.0 if method == "mmpareto" else 0.0)
    before = _snapshot(model)
    plan = StagedFinetuning([Stage(), Stage(start_epoch=1, trainable=["image"])])
    balancer = ModalityBalancer(method, alpha=0.5, log_every_n_steps=1)
    trainer(max_epochs=2, callbacks=[plan, balancer, GradientMonitor(log_every_n_steps=1)]).fit(model, loader())
    assert not _changed(before, model, "encoders.text")  # frozen throughout: the balancer never touched it
    assert _changed(before, model, "encoders.image.stem.0")
    # OGM/AGM report every modality's score; MMPareto only encoders with trainable parameters (text stays frozen).
    assert set(balancer.last) == ({"image"} if method == "mmpareto" else {"image", "text"})


def test_a_scheduler_from_configure_optimizers_works_with_a_plain_plan_on_one_group():
    """A plain freeze / unfreeze plan needs no LR control, so one param group and the user's scheduler are kept as they
    are: frozen parameters get no gradient and do not move (issue 17)."""
    model = tiny_staged_model()
    model.optimizer_factory = lambda groups: torch.optim.AdamW([p for g in groups for p in g["params"]], lr=0.05)
    model.scheduler_factory = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    plan = StagedFinetuning([Stage(), Stage(start_epoch=1, trainable=["text[-1]"])])
    recorder = Recorder()
    before = _snapshot(model)
    run = trainer(max_epochs=1, callbacks=[plan, recorder])
    run.fit(model, loader())
    assert len(run.optimizers[0].param_groups) == 1 and recorder.rows[-1]["lrs"] == {"pg1": 0.025}
    assert not _changed(before, model, "encoders") and _changed(before, model, "fusion")
    run = trainer(max_epochs=2, callbacks=[plan])
    run.fit(model, loader())
    assert _changed(before, model, "encoders.text.layers.2") and not _changed(before, model, "encoders.image")


def test_parameters_missing_from_the_optimizer_are_an_error():
    model = tiny_staged_model()
    model.optimizer_factory = lambda groups: torch.optim.AdamW(
        [p for g in groups for p in g["params"] if p.requires_grad], lr=0.01)  # a common filter
    plan = StagedFinetuning([Stage(), Stage(start_epoch=1, trainable=["image"])])
    with pytest.raises(MisconfigurationException, match="are in no optimizer"):
        trainer(max_epochs=2, callbacks=[plan]).fit(model, loader())


def test_unnamed_groups_get_unique_names_for_the_lr_monitor(tmp_path):
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger

    model = tiny_staged_model()
    model.optimizer_factory = lambda groups: torch.optim.AdamW([  # decay / no-decay, unnamed
        {"params": [p for g in groups for p in g["params"] if p.ndim > 1]},
        {"params": [p for g in groups for p in g["params"] if p.ndim <= 1], "weight_decay": 0.0},
    ], lr=0.01)
    recorder = Recorder()
    plan = StagedFinetuning([Stage(), Stage(start_epoch=1, trainable=["image"])])
    trainer(max_epochs=1, logger=CSVLogger(tmp_path), callbacks=[plan, recorder, LearningRateMonitor()]).fit(
        model, loader())
    names = list(recorder.rows[0]["lrs"])
    # Each group holds image (trains from stage 1), text (frozen) and fusion (always) parameters.
    # Each part of an unnamed group is named after its module and stage (issue 17: "pg1/stage0" named no module).
    assert names == ["pg1/encoders.image/stage1", "pg1/encoders.text/frozen", "pg1/fusion.head/stage0",
                     "pg2/encoders.image/stage1", "pg2/encoders.text/frozen", "pg2/fusion.head/stage0"]


@pytest.mark.parametrize(
    ("plan", "warmup", "kwargs", "message"),
    [
        (lambda: [Stage(), Stage(start_epoch=1, trainable=["image"], lr_multipliers={"image": 0.01})],
         lambda: WarmupDecay(warmup_steps=1, decay="cosine", min_lr=1e-3), {}, "stage 1 .*min_lr"),
        (lambda: [Stage(), Stage(monitor="val/loss", trainable=["image"])], lambda: None, {},
         "has no validation loop"),
    ],
)
def test_stage_problems_found_before_the_first_step(plan, warmup, kwargs, message):
    model = tiny_staged_model(lr=0.05)
    callbacks = [StagedFinetuning(plan())] + ([warmup()] if warmup() is not None else [])
    with pytest.raises((ValueError, MisconfigurationException), match=message):
        trainer(max_epochs=2, callbacks=callbacks, **kwargs).fit(model, loader())
    assert model.global_step == 0


def test_fast_dev_run_with_a_stage_warmup_runs():
    plan = StagedFinetuning([Stage(), Stage(start_step=1, trainable=["image"], warmup_steps=2)])
    trainer(fast_dev_run=2, callbacks=[plan, WarmupDecay(warmup_steps=1)]).fit(tiny_staged_model(), loader())
    assert plan.stage_index == 1


def test_compiled_encoders_are_resolved_through_the_wrapper():
    import types

    from ml_optim_plugins.finetuning import encoder_blocks

    model = tiny_staged_model()
    model.encoders["image"] = torch.compile(model.encoders["image"])
    blocks = encoder_blocks(model.encoders["image"])
    assert blocks[0][0] == "_orig_mod.stem.0.weight" and len(blocks) == 2
    plan = StagedFinetuning([Stage(), Stage(start_epoch=1, trainable=["image[-1]"])])
    plan.setup(types.SimpleNamespace(callbacks=[plan], global_rank=0), model, "fit")
    assert not any(p.requires_grad for p in model.encoders["image"].parameters())
    assert len(plan.plan.trainable[1] - plan.plan.trainable[0]) == 4  # block.0 and block.1, weight and bias


def test_gradual_unfreezing_without_the_contract_says_so():
    with pytest.raises(ValueError, match="has no modality contract"):
        trainer(max_epochs=1, callbacks=[GradualUnfreezing()]).fit(Plain(), loader())


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: StagedFinetuning([Stage(name="probe"), Stage(name="top", start_epoch=1, trainable=["text[-1]"]),
                                   Stage(name="all", start_epoch=1, trainable=["text", "image"])]),
         r"stages 1 \(top\) and 2 \(all\) both start at epoch 1, so stage 1 never trains"),
        (lambda: LinearProbeFinetune(probe_epochs=1, unfreeze=[]), r"unfreeze=\[\]\) unfreezes nothing"),
    ],
)
def test_plans_that_never_train_a_stage_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(("limits", "unit"), [({"max_epochs": 2}, "epoch"), ({"max_epochs": 1}, "epoch"),
                                              ({"max_steps": 6, "max_epochs": 5}, "step")])
def test_a_run_that_ends_before_a_stage_warns_at_fit_start(limits, unit):
    plan = LinearProbeFinetune(probe_epochs=2) if unit == "epoch" else StagedFinetuning(
        [Stage(), Stage(name="finetune", start_step=6, trainable=["image"])])
    with pytest.warns(UserWarning, match=rf"stage 1 \(finetune\) starts at {unit} .* ends the run first.*"
                                         rf"Raise max_{unit}s"):
        trainer(callbacks=[plan], **limits).fit(tiny_staged_model(), loader())


def test_freezing_a_randomly_initialised_encoder_warns():
    from ml_optim_plugins import ConcatFusion, MultimodalClassifier, TimmImageEncoder

    from tests.finetuning.tiny import TinyLayers

    random_image = TimmImageEncoder("test_resnet")
    assert random_image.pretrained_weights is False
    model = MultimodalClassifier({"image": random_image, "text": TinyLayers()}, fusion=ConcatFusion(), num_classes=3)
    with pytest.warns(UserWarning, match="freezes the 'image' encoder .* random weights.*pretrained encoders"):
        trainer(max_steps=1, callbacks=[LinearProbeFinetune(probe_epochs=1)]).fit(model, loader())
