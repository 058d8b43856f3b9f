"""A run interrupted at a checkpoint and resumed with ``--ckpt_path`` continues bit for bit as if it had never stopped:
the quick-start recipe (stages, feature cache, warmup, OGM-GE balancing, Gaussian dropout, text dropout) on CPU, resumed
mid-warmup, mid-epoch inside the finetuning stage and just before the unfreeze. ``metrics.csv`` of the resumed run
directory then equals the uninterrupted run's, row for row and digit for digit."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from ml_optim_plugins.cli import run

STEPS = 16  # 4 epochs x 4 batches: epochs 0-1 probe (cached features), epochs 2-3 finetune


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory) -> tuple[Path, Path]:
    """One uninterrupted run of the shrunk quick start with a checkpoint after every step (the run that a resumed copy
    of its directory must reproduce), and its config."""
    from tests.conftest import tiny_config

    root = tmp_path_factory.mktemp("exact_resume")
    config = yaml.safe_load(tiny_config.__wrapped__(root).read_text())
    config["trainer"]["max_epochs"] = 4
    config["trainer"]["callbacks"].append(
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"every_n_train_steps": 1, "save_top_k": -1, "filename": "{step}"},
        }
    )
    assert any(c["class_path"].endswith("ExactResume") for c in config["trainer"]["callbacks"])
    path = root / "every_step.yaml"
    path.write_text(yaml.safe_dump(config))
    run(["fit", "-c", str(path)])
    return root / "runs" / "quickstart" / "version_0", path


def resume_copy(run_dir: Path, config: Path, step: int, tmp_path: Path) -> Path:
    """Resume a copy of the run directory from its checkpoint at ``step``: as if the run had been interrupted any time
    after that checkpoint (the copy keeps the rows and checkpoints the run wrote after it)."""
    copy = tmp_path / "runs" / "quickstart" / "version_0"
    shutil.copytree(run_dir, copy)
    text = config.read_text().replace(str(run_dir.parent.parent), str(tmp_path / "runs"))
    (tmp_path / "resume.yaml").write_text(text)
    run(["fit", "-c", str(tmp_path / "resume.yaml"), "--ckpt_path", str(copy / "checkpoints" / f"step={step}.ckpt")])
    return copy


def test_the_uninterrupted_run_draws_random_numbers(interrupted_run):
    """Guards the parity test below against passing vacuously: two checkpoints in a row differ in their saved noise."""
    run_dir, _ = interrupted_run
    first, second = (torch.load(run_dir / "checkpoints" / f"step={s}.ckpt", weights_only=False) for s in (9, 10))
    states = [c["callbacks"]["ExactResume"]["random_states"][0]["torch"] for c in (first, second)]
    assert not torch.equal(*states)


@pytest.mark.parametrize(
    "step",
    [
        pytest.param(1, id="mid-warmup"),  # WarmupDecay warms up over the first 2 of 16 steps
        pytest.param(8, id="just-before-the-unfreeze"),  # the last probe step; the finetune stage starts at epoch 2
        pytest.param(10, id="mid-epoch-in-a-stage"),  # epoch 2, inside the finetune stage and its 20-step warmup
    ],
)
def test_a_resumed_run_equals_the_uninterrupted_one(interrupted_run, step, tmp_path):
    run_dir, config = interrupted_run
    resumed = resume_copy(run_dir, config, step, tmp_path)
    # Per-step losses, LRs, balancing coefficients, validation and test metrics: the same rows, the same digits.
    assert (resumed / "metrics.csv").read_text() == (run_dir / "metrics.csv").read_text()
    full = torch.load(run_dir / "checkpoints" / f"step={STEPS}.ckpt", weights_only=False)
    again = torch.load(resumed / "checkpoints" / f"step={STEPS}.ckpt", weights_only=False)
    for name, value in full["state_dict"].items():
        assert torch.equal(value, again["state_dict"][name]), name
    for group_a, group_b in zip(full["optimizer_states"][0]["param_groups"], again["optimizer_states"][0]["param_groups"]):
        assert group_a == group_b
    for key, state in full["optimizer_states"][0]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, again["optimizer_states"][0]["state"][key][name]), (key, name)
    assert again["callbacks"]["ExactResume"] == full["callbacks"]["ExactResume"] or torch.equal(
        again["callbacks"]["ExactResume"]["random_states"][0]["torch"],
        full["callbacks"]["ExactResume"]["random_states"][0]["torch"],
    )
