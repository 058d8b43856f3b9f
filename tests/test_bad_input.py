"""Bad input through the Python API and the CLI (issue 16): each case fails early, with a message naming the value.

The other kinds of the sweep live beside their code: plans that never train a stage and runs that end before one
(tests/finetuning/test_callback.py), a module that never records its outputs (tests/balancing/test_balancer.py), data
errors (tests/data/test_integrity.py), the non-finite policy during training (tests/test_nonfinite.py).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import yaml
from torch import nn

from ml_optim_plugins import (
    ConcatFusion,
    ElasticNetPenalty,
    GatedFusion,
    GradientCheck,
    GaussianDropout,
    GradientMonitor,
    GradualUnfreezing,
    LinearProbeFinetune,
    ModalityBalancer,
    ModalityDropout,
    MultimodalClassifier,
    OverfitBatchCheck,
    RunReport,
    Stage,
    SumFusion,
    TrainingCurves,
    VariationalKL,
    WarmupDecay,
    check_gradients,
)
from ml_optim_plugins.regularization import VariationalLinear
from ml_optim_plugins.schedules import WarmupDecaySchedule
from ml_optim_plugins.functional import agm_coefficients, elastic_net_penalty, ogm_ge_coefficients
from ml_optim_plugins.cli import main
from ml_optim_plugins.cli_errors import short_error

NAN, INF = math.nan, math.inf


def linear_classifier(**kwargs) -> MultimodalClassifier:
    return MultimodalClassifier({"a": nn.Linear(2, 4)}, feature_dims={"a": 4}, num_classes=2, **kwargs)


# (what, constructor, the message it must give)
NON_FINITE = [
    ("balancer alpha NaN", lambda: ModalityBalancer(alpha=NAN), "alpha must be a finite number >= 0, got nan"),
    ("balancer alpha inf", lambda: ModalityBalancer(alpha=INF), "alpha must be a finite number >= 0, got inf"),
    ("balancer gamma NaN", lambda: ModalityBalancer("mmpareto", gamma=NAN), "gamma must be a finite number > 0, got nan"),
    ("AGM max_gap NaN", lambda: ModalityBalancer("agm", max_gap=NAN), "max_gap must be a finite number > 0, got nan"),
    ("AGM clamp NaN", lambda: ModalityBalancer("agm", clamp=(NAN, 10.0)),
     r"clamp must be \(low, high\) with 0 < low <= 1 <= high, got \(nan, 10.0\) \(low must be a finite number"),
    ("OGM-GE core alpha NaN", lambda: ogm_ge_coefficients({"a": 1.0, "b": 2.0}, NAN), "alpha must be a finite number"),
    ("AGM core alpha inf", lambda: agm_coefficients({"a": 1.0, "b": 2.0}, {"a": 1.0, "b": 2.0}, INF),
     "alpha must be a finite number >= 0, got inf"),
    ("stage LR multiplier NaN", lambda: Stage(lr_multipliers={"text": NAN}),
     r"Stage lr_multipliers\['text'\] must be a finite number >= 0, got nan"),
    ("stage min_delta NaN", lambda: Stage(monitor="val/loss", min_delta=NAN), "Stage min_delta must be a finite number"),
    ("probe LR multiplier inf", lambda: LinearProbeFinetune(lr_multipliers={"image": INF}),
     r"lr_multipliers\['image'\] must be a finite number >= 0, got inf"),
    ("ULMFiT factor NaN", lambda: GradualUnfreezing(factor=NAN), "must be a finite number >= 1, got nan"),
    ("ULMFiT factor inf", lambda: GradualUnfreezing(factor=INF), "must be a finite number >= 1, got inf"),
    ("WarmupDecay LR multiplier NaN", lambda: WarmupDecay(warmup_steps=1, lr_multipliers={"encoders.*": NAN}),
     r"WarmupDecay: lr_multipliers\['encoders.\*'\] must be a finite number >= 0, got nan"),
    ("warmup ratio NaN", lambda: WarmupDecaySchedule(warmup_ratio=NAN), r"warmup_ratio must be a finite number in \[0, 1\)"),
    ("min_lr NaN", lambda: WarmupDecaySchedule(min_lr=NAN), "min_lr must be a finite number >= 0, got nan"),
    ("min_lr_ratio NaN", lambda: WarmupDecaySchedule(min_lr_ratio=NAN), r"min_lr_ratio must be a finite number in \[0, 1\]"),
    ("cycle_mul inf", lambda: WarmupDecaySchedule(cycles=2, cycle_mul=INF), "cycle_mul must be a finite number > 0"),
    ("power NaN", lambda: WarmupDecaySchedule(total_steps=10, decay="polynomial", power=NAN),
     "power must be a finite number > 0, got nan"),
    ("gamma NaN", lambda: WarmupDecaySchedule(decay="exponential", gamma=NAN), r"gamma must be a finite number in \(0, 1\]"),
    ("timescale NaN", lambda: WarmupDecaySchedule(decay="inverse_sqrt", timescale=NAN),
     "timescale must be a finite number > 0, got nan"),
    ("base LR inf", lambda: WarmupDecaySchedule().check_base_lr(INF, "fusion"),
     "the learning rate of param group fusion must be a finite number >= 0, got inf"),
    ("Gaussian dropout p NaN", lambda: GaussianDropout(NAN), r"p must be a dropout rate in \[0, 1\), got nan"),
    ("Gaussian dropout p -0.1", lambda: GaussianDropout(-0.1), r"p must be a dropout rate in \[0, 1\), got -0.1"),
    ("Gaussian dropout p 1", lambda: GaussianDropout(1.0), "got 1.0; a rate of 1 drops every unit"),
    ("modality dropout fill NaN", lambda: ModalityDropout(fill=NAN), "fill must be a finite number, got nan"),
    ("aux_loss_weight NaN", lambda: linear_classifier(aux_loss_weight=NAN), "aux_loss_weight must be a finite number >= 0"),
    ("aux_loss_weight inf", lambda: linear_classifier(aux_loss_weight=INF), "aux_loss_weight must be a finite number >= 0"),
    ("elastic net l1 NaN", lambda: ElasticNetPenalty(l1=NAN), "l1 must be a finite number >= 0, got nan"),
    ("elastic net l2 inf", lambda: elastic_net_penalty([torch.ones(1)], l2=INF), "l2 must be a finite number >= 0"),
    ("KL weight NaN", lambda: VariationalKL(weight=NAN), "weight must be a finite number >= 0, got nan"),
    ("variational threshold NaN", lambda: VariationalLinear(2, 2, threshold=NAN), "threshold must be a finite number"),
    ("overfit check lr NaN", lambda: OverfitBatchCheck(lr=NAN), "lr must be a finite number >= 0, got nan"),
    ("gradient check eps NaN", lambda: check_gradients(nn.Linear(2, 1), torch.ones(1, 2), lambda m, b: m(b).sum(),
                                                       eps=NAN), "eps must be a finite number > 0, got nan"),
    ("monitor norm_type NaN", lambda: GradientMonitor(norm_type=NAN), "norm_type must be a number > 0, got nan"),
    ("monitor vanishing NaN", lambda: GradientMonitor(vanishing=NAN), "vanishing must be a finite number >= 0"),
    # Counts and intervals: a float NaN would never match (step % nan), so nothing would be logged or triggered.
    ("stage patience NaN", lambda: Stage(monitor="val/loss", patience=NAN), "Stage patience must be an integer >= 1"),
    ("monitor interval NaN", lambda: GradientMonitor(log_every_n_steps=NAN),
     "log_every_n_steps must be an integer >= 1, got nan"),
    ("balancer interval inf", lambda: ModalityBalancer(log_every_n_steps=INF),
     "log_every_n_steps must be an integer >= 1, got inf"),
    ("late warmup NaN", lambda: WarmupDecay(late_warmup_steps=NAN), "late_warmup_steps must be an integer >= 0"),
    ("curves interval NaN", lambda: TrainingCurves(every_n_epochs=NAN), "every_n_epochs must be an integer >= 0"),
    ("report smoothing 0.5", lambda: RunReport(smoothing=0.5), "smoothing must be an integer >= 1, got 0.5"),
    ("KL warmup NaN", lambda: VariationalKL(warmup_steps=NAN), "warmup_steps must be an integer >= 0, got nan"),
    ("gradient check interval NaN", lambda: GradientCheck(every_n_epochs=NAN), "every_n_epochs must be an integer >= 1"),
]


@pytest.mark.parametrize(("make", "message"), [case[1:] for case in NON_FINITE], ids=[case[0] for case in NON_FINITE])
def test_non_finite_and_out_of_range_values_are_refused_by_name(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_infinities_that_mean_something_are_kept():
    """The max-norm and a threshold that never fires are legitimate infinities."""
    monitor = GradientMonitor(norm_type=INF, exploding=INF)
    assert monitor.norm_type == INF and monitor.exploding == INF


@pytest.mark.parametrize("fusion", [ConcatFusion, SumFusion, GatedFusion])
@pytest.mark.parametrize("dropout", [1.0, NAN, nn.Dropout(1.0)], ids=["rate 1", "rate NaN", "nn.Dropout(1)"])
def test_a_fusion_dropout_that_drops_everything_is_refused(fusion, dropout):
    """dropout=1.0 zeroed every fused feature: only the head's bias could train."""
    with pytest.raises(ValueError, match=r"dropout(.p)? must be a dropout rate in \[0, 1\)"):
        fusion(dropout=dropout)


@pytest.mark.parametrize(("lr", "message"), [
    (0.0, "every param group of AdamW has lr=0, so no weight would change"),
    (INF, "the learning rate of param group 'encoders.a' must be a finite number >= 0, got inf"),
])
def test_an_optimizer_that_cannot_train_is_refused(lr, message):
    model = linear_classifier(optimizer=lambda groups: torch.optim.AdamW(groups, lr=lr))
    with pytest.raises(ValueError, match=message):
        model.configure_optimizers()


def test_a_zero_learning_rate_group_beside_others_is_a_gate_not_an_error():
    model = linear_classifier(optimizer=lambda groups: torch.optim.SGD(
        [{**group, "lr": 0.0} if group["name"] == "encoders.a" else group for group in groups], lr=0.1))
    assert [group["lr"] for group in model.configure_optimizers().param_groups] == [0.0, 0.1]


# ------------------------------------------------------------------ through the command line


def cli_error(capsys, *args: str) -> str:
    """The CLI's stderr after it exits with status 1."""
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    assert exited.value.code == 1
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.init_args.aux_loss_weight", "-1"],
         "ValueError in MultimodalClassifier.__init__: aux_loss_weight must be a finite number >= 0, got -1.0"),
        (["--model.init_args.fusion.init_args.dropout", "1.0"],
         r"ValueError in ConcatFusion.__init__: dropout must be a dropout rate in \[0, 1\), got 1.0"),
        (["--model.init_args.fusion.init_args.dropout.init_args.p", ".nan"],
         r"ValueError in GaussianDropout.__init__: p must be a dropout rate in \[0, 1\), got nan"),
        (["--model.init_args.encoders.image.init_args.model_name", "resnet_nope"],
         "ValueError in TimmImageEncoder.__init__: unknown timm model 'resnet_nope'"),
        (["--trainer.max_epochs", "0"],
         "trainer.max_epochs=0: fit would train nothing, and the untrained model would be validated and tested"),
        (["--model.init_args.optimizer.init_args.lr", "0"], "every param group of AdamW has lr=0"),
    ],
    ids=["constructor", "fusion dropout 1", "nested subclass", "unknown encoder", "max_epochs 0", "lr 0"],
)
def test_our_errors_reach_the_terminal_as_one_line(tiny_config, capsys, args, message):
    err = cli_error(capsys, "fit", "-c", str(tiny_config), *args)
    lines = [line for line in err.splitlines() if line.startswith("ml-optim-plugins: error:")]
    assert len(lines) == 1 and re.search(message, lines[0]), err
    assert "Traceback" not in err and "Does not validate against any of the Union subtypes" not in err
    assert "(full traceback: JSONARGPARSE_DEBUG=true)" in err


def test_the_full_traceback_is_one_variable_away(tiny_config, monkeypatch):
    monkeypatch.setenv("JSONARGPARSE_DEBUG", "true")
    with pytest.raises(ValueError, match="Does not validate against any of the Union subtypes") as raised:
        main(["fit", "-c", str(tiny_config), "--model.init_args.aux_loss_weight", "-1"])
    assert "aux_loss_weight must be a finite number >= 0" in str(raised.value)


def test_a_bug_keeps_its_traceback():
    try:
        [].no_such_method()
    except AttributeError as err:
        assert short_error(err) is None


def test_a_missing_pretraining_checkpoint_says_which_recipe_writes_it(tiny_config, capsys, tmp_path, monkeypatch):
    # In an empty directory: after README command (a), the repository's own runs/pretrain_image/ holds the file.
    monkeypatch.chdir(tmp_path)
    err = cli_error(capsys, "fit", "-c", str(tiny_config), "--model.init_args.encoders.image.init_args.checkpoint_path",
                    "runs/pretrain_image/image-encoder.ckpt")
    assert "FileNotFoundError in TimmImageEncoder.__init__: image encoder checkpoint_path " \
           "'runs/pretrain_image/image-encoder.ckpt' does not exist" in err
    assert "ml-optim-plugins fit -c recipes/pretrain_image.yaml" in err and "set checkpoint_path: null" in err


# ------------------------------------------------------------------ null and partial overrides of the encoders


def parsed_model(tiny_config, *args: str) -> MultimodalClassifier:
    from ml_optim_plugins import MultimodalDataModule
    from ml_optim_plugins.cli import MultimodalCLI

    cli = MultimodalCLI(MultimodalClassifier, MultimodalDataModule, subclass_mode_model=True, subclass_mode_data=True,
                        run=False, args=["-c", str(tiny_config), *args])
    return cli.model


@pytest.fixture
def with_checkpoint(tiny_config, tmp_path):
    """The tiny quick start with the recipe's checkpoint_path restored, pointing at a real file of test_resnet
    weights (as recipes/pretrain_image.yaml would write)."""
    from ml_optim_plugins import TimmImageEncoder

    torch.manual_seed(3)
    weights = tmp_path / "image-encoder.ckpt"
    torch.save({"state_dict": {f"encoders.image.{k}": v for k, v in
                               TimmImageEncoder("test_resnet").state_dict().items()}}, weights)
    config = yaml.safe_load(tiny_config.read_text())
    config["model"]["init_args"]["encoders"]["image"]["init_args"].update(
        checkpoint_path=str(weights), checkpoint_prefix="encoders.image.")
    tiny_config.write_text(yaml.safe_dump(config))
    return weights


def test_null_on_the_command_line_means_no_checkpoint(tiny_config, with_checkpoint):
    model = parsed_model(tiny_config, "--model.init_args.encoders.image.init_args.checkpoint_path", "null")
    assert sorted(model.encoders) == ["image", "text"]
    assert model.encoders["image"].pretrained_weights is False  # was the string 'None', a missing file
    assert model.hparams["encoders"]["image"]["init_args"]["checkpoint_path"] is None


def test_a_second_config_overriding_one_encoder_keeps_the_others(tiny_config, with_checkpoint, tmp_path):
    override = tmp_path / "no_pretraining.yaml"
    override.write_text(yaml.safe_dump(
        {"model": {"init_args": {"encoders": {"image": {"init_args": {"checkpoint_path": None}}}}}}))
    model = parsed_model(tiny_config, "-c", str(override))
    assert sorted(model.encoders) == ["image", "text"]  # jsonargparse alone dropped "text"
    image = model.encoders["image"]
    assert image.pretrained_weights is False and image.model_name == "test_resnet"  # the other image arguments kept
    assert model.encoders["text"].model.max_seq_length == 24


def test_a_modality_is_removed_only_when_asked(tiny_config):
    model = parsed_model(tiny_config, "--model.init_args.encoders.text", "null",
                         "--model.init_args.encoders.image.init_args.model_name", "test_resnet")
    assert sorted(model.encoders) == ["image"]


@pytest.mark.parametrize(
    ("data", "key"),
    [("ml_optim_plugins.ManifestDataModule", "val"), ("ml_optim_plugins.ManifestDataModule", "image_root"),
     ("ml_optim_plugins.MVSADataModule", "split_dir"), ("ml_optim_plugins.SyntheticSentimentDataModule", "tokenizer"),
     ("ml_optim_plugins.SyntheticSentimentDataModule", "image_model")],
)
def test_null_means_none_for_the_data_modules_optional_paths(tiny_config, data, key):
    from ml_optim_plugins import MultimodalDataModule
    from ml_optim_plugins.cli import MultimodalCLI

    required = {"ml_optim_plugins.ManifestDataModule": ["--data.init_args.train", "t.csv"],
                "ml_optim_plugins.MVSADataModule": ["--data.init_args.root", "mvsa"]}.get(data, [])
    parser = MultimodalCLI(MultimodalClassifier, MultimodalDataModule, subclass_mode_model=True,
                           subclass_mode_data=True, run=False, args=["-c", str(tiny_config)]).parser
    config = parser.parse_args(["-c", str(tiny_config), "--data", data, *required, f"--data.init_args.{key}", "null"])
    assert config.data.init_args[key] is None
