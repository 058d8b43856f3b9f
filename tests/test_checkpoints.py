"""Checkpoints are bound to their configuration: ``--ckpt_path`` with another model or data config is refused, naming
each differing setting, unless ``--allow_config_change true``."""

from __future__ import annotations

import pytest

from ml_optim_plugins.checkpoints import check_checkpoint_config, config_differences
from ml_optim_plugins.cli import run


@pytest.mark.parametrize(
    ("saved", "current", "expected"),
    [
        ({"a": 1, "b": {"c": (1, 2)}}, {"a": 1, "b": {"c": [1, 2]}}, []),
        ({"a": 1}, {"a": 2}, [("a", 1, 2)]),
        ({"enc": {"image": {"x": 1}}}, {"enc": {"image": {"x": 1}, "text": {"y": 2}}}, [("enc.text.y", "(absent)", 2)]),
        ({"_instantiator": "a", "n": [{"p": 1}]}, {"_instantiator": "b", "n": [{"p": 2}]}, [("n[0].p", 1, 2)]),
    ],
)
def test_config_differences(saved, current, expected):
    assert config_differences(saved, current) == expected


def test_ignored_keys_are_not_reported():
    assert config_differences({"num_workers": 0, "seed": 1}, {"num_workers": 4, "seed": 1}, ignore={"num_workers"}) == []


@pytest.fixture
def trained(tiny_run):
    return tiny_run.config, str(tiny_run.checkpoint)


GAUSSIAN_P = "--model.init_args.fusion.init_args.dropout.init_args.p"


@pytest.mark.parametrize(
    ("subcommand", "override", "named"),
    [
        ("test", [GAUSSIAN_P, "0.5"], "model.init_args.fusion.init_args.dropout.init_args.p: 0.2 in the checkpoint, 0.5 in this run"),
        ("validate", ["--data.init_args.val_size", "8"], "data.val_size: 16 in the checkpoint, 8 in this run"),
        ("fit", ["--model.init_args.aux_loss_weight", "0.5"], "model.init_args.aux_loss_weight: 0.0 in the checkpoint, 0.5 in this run"),
    ],
)
def test_a_checkpoint_from_another_config_is_refused(trained, subcommand, override, named):
    config, checkpoint = trained
    with pytest.raises(ValueError, match="saved with another configuration") as error:
        run([subcommand, "-c", str(config), "--ckpt_path", checkpoint, *override])
    assert named in str(error.value) and "--allow_config_change true" in str(error.value)


def test_the_same_config_and_an_explicit_override_are_accepted(trained):
    config, checkpoint = trained
    tested = run(["test", "-c", str(config), "--ckpt_path", checkpoint])
    assert "test/acc" in tested.trainer.callback_metrics
    # Accepted on request: the data is the run's, the model the checkpoint's (LightningCLI builds it from its hparams).
    allow = ["--allow_config_change", "true"]
    changed = run(["test", "-c", str(config), "--ckpt_path", checkpoint, GAUSSIAN_P, "0.5", "--data.init_args.batch_size", "4", *allow])
    assert changed.datamodule.batch_size == 4 and changed.model.fusion.dropout.p == 0.2


def test_num_workers_may_differ(trained, tmp_path):
    config, checkpoint = trained
    check_checkpoint_config(checkpoint, None, {**_data_hparams(checkpoint), "num_workers": 3})


def _data_hparams(checkpoint):
    import torch

    return dict(torch.load(checkpoint, weights_only=False)["datamodule_hyper_parameters"])
