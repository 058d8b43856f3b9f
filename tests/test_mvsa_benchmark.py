"""benchmarks/mvsa_single.py, the MVSA-Single sweep: every row's configuration is one the library accepts (a row that
fails after hours of other rows is caught here), fold rows are kept apart from split-seed rows, a failed row does not
stop the sweep."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import subprocess
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import yaml

from tests.data.mvsa_fixture import write_mvsa

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "mvsa_single.py"


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("mvsa_single", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def class_defaults(cls) -> dict:
    """The defaults of ``cls``'s arguments, those it passes on through ``**kwargs`` to a base class included."""
    defaults: dict = {}
    for klass in cls.__mro__:
        parameters = inspect.signature(klass.__init__).parameters.values() if "__init__" in vars(klass) else []
        defaults = {**{p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}, **defaults}
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters) and "__init__" in vars(klass):
            break
    return defaults


def with_defaults(spec):
    """A config with every ``class_path``'s unset arguments (and the trainer's) at their defaults, and callbacks in
    a fixed order, so that two configs compare by what they build (``aux_loss_weight: 0.0`` written out equals it
    left at its default)."""
    if isinstance(spec, dict) and "class_path" in spec:
        module, name = spec["class_path"].rsplit(".", 1)
        defaults = class_defaults(getattr(importlib.import_module(module), name))
        return {"class_path": spec["class_path"], "init_args": with_defaults({**defaults, **spec.get("init_args", {})})}
    if isinstance(spec, dict) and "trainer" in spec:
        trainer = {**class_defaults(pl.Trainer), **spec["trainer"]}
        trainer["callbacks"] = sorted(with_defaults(trainer.get("callbacks") or []),
                                     key=lambda c: json.dumps(c, sort_keys=True, default=str))
        return {**{k: with_defaults(v) for k, v in spec.items()}, "trainer": {**with_defaults(trainer),
                                                                            "callbacks": trainer["callbacks"]}}
    if isinstance(spec, dict):
        return {k: with_defaults(v) for k, v in spec.items()}
    if isinstance(spec, (list, tuple)):
        return [with_defaults(v) for v in spec]
    return spec


def instantiate(spec):
    """A ``class_path`` / ``init_args`` mapping built as the CLI would (nested ones first)."""
    if isinstance(spec, dict) and "class_path" in spec:
        module, name = spec["class_path"].rsplit(".", 1)
        return getattr(importlib.import_module(module), name)(**instantiate(spec.get("init_args", {})))
    if isinstance(spec, dict):
        return {k: instantiate(v) for k, v in spec.items()}
    return spec


def row_config(sweep, row, tmp_path, split_dir=None):
    path, args = sweep.trained_config(row, str(tmp_path / "data"), 1, tmp_path / "work", [], split_dir)
    return yaml.safe_load(path.read_text()), path, args


@pytest.mark.parametrize("row", ["recipe", "stages_only", "aux", "mmpareto", "no_gaussian_dropout", "augment",
                                 "end_to_end", "text_only", "image_only"])
def test_every_row_builds_callbacks_the_library_accepts_for_the_encoders_it_keeps(sweep, row, tmp_path):
    config, path, args = row_config(sweep, row, tmp_path)
    assert args[:3] == ["fit", "-c", str(path)] and path.parent == tmp_path / "work" / "configs"
    callbacks = {type(c).__name__: c for c in map(instantiate, config["trainer"]["callbacks"])}
    assert "GradientCheck" not in callbacks and config["trainer"]["enable_progress_bar"] is False  # no weight change
    encoders = set(config["model"]["init_args"]["encoders"])
    assert config["seed_everything"] == 1 and config["data"]["init_args"]["split_seed"] == 1
    fusion = instantiate(config["model"]["init_args"]["fusion"])  # as the CLI builds it (no_gaussian_dropout failed)
    dropouts = {type(m).__name__ for m in fusion.modules() if "Dropout" in type(m).__name__}
    assert dropouts == ({"Dropout"} if row == "no_gaussian_dropout" else {"GaussianDropout"})
    assert row != "no_gaussian_dropout" or fusion.dropout.p == 0.0
    staged = callbacks.get("LinearProbeFinetune")
    if row == "end_to_end":
        # Both encoders at the recipe's finetuning multiplier (the recipe unfreezes only the text encoder).
        multipliers = callbacks["WarmupDecay"].lr_multipliers
        assert staged is None and multipliers == {"encoders.image": 0.1, "encoders.text": 0.1}
        return
    unfrozen = {selector.split("[")[0] for stage in staged.stages[1:] for selector in stage.trainable}
    assert unfrozen and unfrozen <= encoders, (unfrozen, encoders)
    balanced = ("recipe", "mmpareto", "no_gaussian_dropout", "augment")
    assert ("ModalityBalancer" in callbacks) == (row in balanced)


def test_no_two_rows_train_the_same_configuration(sweep, tmp_path):
    """Each trained row changes the recipe in its own way: a row equal to another (an "OGM-GE" row while the recipe
    already balances with OGM-GE) would spend its hours repeating that row's run."""
    configs = {row: with_defaults(row_config(sweep, row, tmp_path)[0]) for row in sweep.TRAINED}
    for config in configs.values():
        config["trainer"]["logger"] = None  # each row logs under its own name
    same = [(a, b) for a in configs for b in configs if a < b and configs[a] == configs[b]]
    assert not same, same


def test_image_only_finetunes_the_image_encoders_top_blocks_as_the_recipe_does_the_text_encoder(sweep, tmp_path):
    config, _, _ = row_config(sweep, "image_only", tmp_path)
    staged = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("LinearProbeFinetune"))
    recipe, _, _ = row_config(sweep, "text_only", tmp_path)
    text = next(c for c in recipe["trainer"]["callbacks"] if c["class_path"].endswith("LinearProbeFinetune"))
    assert list(config["model"]["init_args"]["encoders"]) == ["image"]
    assert staged["init_args"]["unfreeze"] == ["image[-2:]"] and text["init_args"]["unfreeze"] == ["text"]
    assert staged["init_args"]["lr_multipliers"] == {"image": text["init_args"]["lr_multipliers"]["text"]}
    assert staged["init_args"]["cache_activations"] is True and "cache_activations" not in text["init_args"]


def test_the_image_only_row_trains_its_top_blocks_on_tiny_data(sweep, tmp_path, monkeypatch):
    """The row end to end through the CLI, shrunk (test_resnet, 40 posts, one probe epoch): the run leaves the probe
    and serves the image encoder's lower blocks from the activation cache."""
    from ml_optim_plugins.cli import run

    config, path, args = row_config(sweep, "image_only", tmp_path)
    image = config["model"]["init_args"]["encoders"]["image"]["init_args"]
    image.update(model_name="test_resnet", pretrained=False)
    config["data"]["init_args"].update(root=str(write_mvsa(tmp_path / "mvsa", n=40)), image_model="test_resnet",
                                       image_size=32, batch_size=8, num_workers=0)
    config["trainer"].update(max_epochs=2, accelerator="cpu", log_every_n_steps=1, enable_model_summary=False)
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("LinearProbeFinetune"):
            callback["init_args"].update(probe_epochs=1, warmup_steps=2)
    path.write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    trainer = run(["fit", "-c", str(path)]).trainer
    staged = next(c for c in trainer.callbacks if type(c).__name__ == "LinearProbeFinetune")
    assert [b["stage"] for b in staged.boundaries] == [0, 1] and staged.stage_index == 1
    cache = staged.activation_cache
    assert list(cache.splits) == ["image"] and cache.stats()["image"]["misses"] > 0  # filled in the finetuning epoch
    assert not any(p.requires_grad for p in trainer.lightning_module.encoders["image"].model.conv1.parameters())


def write_rows(path: Path, *rows: dict) -> Path:
    path.write_text("".join(json.dumps({"test": {"acc": 0.5, "f1": 0.4, "f1_weighted": 0.45}, **r}) + "\n"
                            for r in rows))
    return path


def test_fold_rows_are_neither_skipped_for_nor_averaged_with_split_seed_rows(sweep, tmp_path):
    results = write_rows(tmp_path / "results.jsonl",
                         {"row": "recipe", "seed": 1, "split": "seeded 8:1:1"},
                         {"row": "majority", "seed": 2},  # written before rows recorded their split
                         {"row": "recipe", "seed": 2, "split": "Cheema et al. fold 2"})
    assert sweep._done(results) == {("recipe", 1), ("majority", 2)}
    assert sweep._done(results, split_dir="folds") == {("recipe", 2)}
    table = sweep.summarize([results])
    assert "| recipe | 1 | 50.00 | 40.00 |" in table and "| recipe (Cheema et al. folds) | 2 | 50.00 |" in table
    two_seeds = sweep.summarize([write_rows(tmp_path / "two.jsonl", {"row": "recipe", "seed": 1, "val_f1_selected": 0.6},
                                            {"row": "recipe", "seed": 2, "test": {"acc": 0.7, "f1": 0.4}})])
    assert "| recipe | 1,2 | 60.00 ± 14.14 | 40.00 ± 0.00 | 45.00 (n=1) | 60.00 (n=1) |" in two_seeds


def test_the_table_shows_the_validation_macro_f1_each_row_was_selected_on(sweep, tmp_path):
    table = sweep.summarize([write_rows(
        tmp_path / "results.jsonl",
        {"row": "recipe", "seed": 0, "val_f1_selected": 0.7, "val_per_epoch": [{"acc": 0.9, "f1": 0.8}]},
        {"row": "recipe", "seed": 1, "val_f1_selected": 0.6},
        {"row": "frozen elastic-net text", "seed": 0, "val": {"acc": 0.9, "f1": 0.55}},
        {"row": "majority", "seed": 0})])
    assert "| val macro-F1 (selected) |" in table.splitlines()[0]
    # the selected checkpoint's figure, not the best epoch's; a fitted row's chosen hyperparameters; none to select
    assert "| recipe | 0,1 | 50.00 ± 0.00 | 40.00 ± 0.00 | 45.00 ± 0.00 | 65.00 ± 7.07 | - | - | - |" in table
    assert "| frozen elastic-net text | 0 | 50.00 | 40.00 | 45.00 | 55.00 | - | - | - |" in table
    assert "| majority | 0 | 50.00 | 40.00 | 45.00 | - | - | - | - |" in table


def test_the_table_shows_each_rows_epoch_time_beside_the_load_it_was_taken_under(sweep, tmp_path):
    table = sweep.summarize([write_rows(
        tmp_path / "results.jsonl",
        {"row": "recipe", "seed": 0, "epoch_seconds": [100.0, 200.0], "epoch_load": [2.0, 4.0], "run_seconds": 400},
        {"row": "recipe", "seed": 1, "epoch_seconds": [None, 300.0], "epoch_load": [None, 1.0], "run_seconds": None},
        {"row": "augment", "seed": 0, "epoch_seconds": [250.0], "run_seconds": 600})])  # loads not recorded yet
    assert "| s / train epoch | load / epoch | s / run |" in table.splitlines()[0]
    assert table.splitlines()[2].endswith("| 200 | 2.3 | 400 |")  # unknown epochs (a resume's lost ones) left out
    assert table.splitlines()[3].endswith("| 250 | - | 600 |")


def test_rows_are_paired_by_seed_against_one_row_on_the_seeds_both_have(sweep, tmp_path, capsys):
    def row(name, seed, acc, f1=0.5, split="seeded 8:1:1"):
        return {"row": name, "seed": seed, "split": split, "test": {"acc": acc, "f1": f1, "f1_weighted": acc}}
    results = write_rows(tmp_path / "results.jsonl",
                         row("recipe", 0, 0.70), row("recipe", 1, 0.74), row("recipe", 2, 0.72),
                         row("aux", 0, 0.71, f1=0.45), row("aux", 1, 0.70), row("aux", 9, 0.99),  # seed 9: no pair
                         row("augment", 2, 0.72),
                         row("lonely", 5, 0.60),  # no seed in common: left out
                         row("recipe", 0, 0.50, split="Cheema et al. fold 0"),
                         row("aux", 0, 0.55, split="Cheema et al. fold 0"))
    sweep.main(["--summarize", str(results), "--against", "recipe"])
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| row | seeds shared with recipe | Δ accuracy |")
    # per-seed differences +1 and -4 points: mean -1.50, standard deviation 3.54; one seed above, one below
    assert "| aux | 0,1 | -1.50 ± 3.54 | -2.50 ± 3.54 | -1.50 ± 3.54 | 1 / 0 / 1 |" in table
    assert "| augment | 2 | +0.00 | +0.00 | +0.00 | 0 / 1 / 0 |" in table
    assert "| aux (Cheema et al. folds) | 0 | +5.00 | +0.00 | +5.00 | 1 / 0 / 0 |" in table  # folds against folds
    assert not any(line.startswith(("| lonely", "| recipe")) for line in table)
    with pytest.raises(SystemExit):
        sweep.main(["--root", str(tmp_path), "--against", "recipe"])  # nothing to pair: refused, nothing trains
    assert "--against pairs the rows of --summarize's files" in capsys.readouterr().err


def test_a_row_records_the_commit_it_ran_and_whether_its_files_differed_from_it(sweep, tmp_path):
    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path / "repo"), "-c", "user.name=t", "-c", "user.email=t@t",
                               *args], capture_output=True, text=True, check=True).stdout.strip()
    package = tmp_path / "repo" / "src"
    package.mkdir(parents=True)
    (package / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "first")
    head = git("rev-parse", "--short=12", "HEAD")
    assert sweep.revision(package) == head
    (tmp_path / "repo" / "notes.txt").write_text("elsewhere\n")  # a change outside the package does not count
    (package / "scratch.py").write_text("y = 1\n")  # nor an untracked file (git describe --dirty's rule)
    assert sweep.revision(package) == head
    (package / "code.py").write_text("x = 2\n")
    assert sweep.revision(package) == head + "+dirty"
    (tmp_path / "copy").mkdir()  # not a checkout (an installed package): no commit to claim
    assert sweep.revision(tmp_path / "copy") is None


def test_a_failed_row_is_reported_and_the_sweep_goes_on(sweep, tmp_path, monkeypatch, capsys):
    results = write_rows(tmp_path / "results.jsonl", {"row": "recipe", "seed": 0, "split": "seeded 8:1:1"})
    started, paths = [], set()

    def child(command, **kwargs):
        row, seed = command[command.index("--child") + 1:][:2]
        started.append((row, seed))
        paths.add(kwargs["env"]["PYTHONPATH"])
        return type("Done", (), {"returncode": 1 if row == "image_only" else 0})()

    monkeypatch.setattr(sweep.subprocess, "run", child)
    monkeypatch.setenv("PYTHONPATH", "/the/callers/checkout")
    with pytest.raises(SystemExit, match=r"1 row\(s\) failed: image_only seed 0; rerun them once fixed"):
        sweep.main(["--root", str(tmp_path), "--results", str(results), "--work", str(tmp_path / "work"),
                    "--rows", "recipe", "image_only", "text_only", "--seeds", "0"])
    assert started == [("image_only", "0"), ("text_only", "0")]  # the finished recipe row is skipped
    # each child imports the benchmark by name, and the caller's own PYTHONPATH stays behind it
    assert paths == {f"{BENCHMARK.parent}{os.pathsep}/the/callers/checkout"}
    out = capsys.readouterr().out
    assert "recipe seed 0: already in" in out and "image_only seed 0: FAILED (exit 1); going on" in out


def test_under_split_dir_fold_rows_run_although_split_seed_rows_of_those_numbers_exist(sweep, tmp_path, monkeypatch):
    results = write_rows(tmp_path / "results.jsonl", {"row": "recipe", "seed": 1, "split": "seeded 8:1:1"},
                         {"row": "recipe", "seed": 2, "split": "Cheema et al. fold 2"})
    started = []
    monkeypatch.setattr(sweep.subprocess, "run", lambda command, **kwargs: started.append(command) or
                        type("Done", (), {"returncode": 0})())
    sweep.main(["--root", str(tmp_path), "--results", str(results), "--work", str(tmp_path / "work"),
                "--split-dir", "folds", "--rows", "recipe", "--seeds", "1", "2"])
    assert [c[c.index("--child") + 1:][:2] for c in started] == [["recipe", "1"]]  # fold 2 is done, fold 1 is not
    assert started[0][started[0].index("--split-dir") + 1] == "folds"


def test_a_row_is_probed_once_under_its_own_split_protocol(sweep, tmp_path, monkeypatch, capsys):
    results = write_rows(tmp_path / "results.jsonl",
                         {"row": "image_only", "seed": 0, "split": "seeded 8:1:1"},
                         {"row": "probe after image_only image", "seed": 0, "split": "seeded 8:1:1"},
                         {"row": "recipe", "seed": 1, "split": "seeded 8:1:1"})
    probed = []
    monkeypatch.setattr(sweep, "probe_rows", lambda root, row, seed, *a: probed.append((row, seed)) or [])
    common = ["--root", str(tmp_path), "--results", str(results), "--work", str(tmp_path / "work")]
    sweep.main([*common, "--probe", "image_only", "recipe", "--seeds", "0", "1"])
    assert probed == [("recipe", 1)]  # image_only's one probe row counts; recipe seed 0 never ran
    sweep.main([*common, "--split-dir", "folds", "--probe", "recipe", "--seeds", "1"])
    assert probed == [("recipe", 1)] and "probe after recipe seed 1: no finished run" in capsys.readouterr().out


def test_a_probe_whose_checkpoint_is_gone_is_named_and_the_others_still_run(sweep, tmp_path, monkeypatch, capsys):
    """A finished row trained on another machine (its run directory gone) cannot be probed: the probe says which
    checkpoint it looked for, the next probes run, and the command exits non-zero."""
    results = write_rows(tmp_path / "results.jsonl",
                         {"row": "aux", "seed": 0, "split": "seeded 8:1:1", "selected_checkpoint": "best-epoch=4.ckpt"},
                         {"row": "recipe", "seed": 0, "split": "seeded 8:1:1"})
    real = sweep.probe_rows
    probed = []
    monkeypatch.setattr(sweep, "probe_rows", lambda root, row, seed, *a: (probed.append(row) or []) if row == "recipe"
                        else real(root, row, seed, *a))
    with pytest.raises(SystemExit, match="1 probe.s. failed: probe after aux seed 0"):
        sweep.main(["--root", str(tmp_path), "--results", str(results), "--work", str(tmp_path / "work"),
                    "--probe", "aux", "recipe", "--seeds", "0"])
    assert probed == ["recipe"]
    out = capsys.readouterr().out
    assert "probe after aux seed 0: its selected checkpoint 'best-epoch=4.ckpt' is in none of" in out
    assert "train the row again here with another --results file" in out


def test_baseline_rows_record_their_split(sweep, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    ids = [str(i) for i in range(60)]
    labels = np.array([i % 3 for i in range(60)])
    features = {name: rng.normal(size=(60, 4)) + labels[:, None] for name in ("image", "text")}
    (tmp_path / "work").mkdir()
    np.savez(tmp_path / "work" / "frozen.npz", labels=labels, ids=np.array(ids),
             **{f"f_{k}": v for k, v in features.items()})
    monkeypatch.setattr(sweep, "split_ids", lambda root, seed, split_dir: {
        "train": ids[:40], "val": ids[40:50], "test": ids[50:]})
    rows = sweep.frozen_rows(str(tmp_path), 3, tmp_path / "work", split_dir="folds")
    assert rows[0]["row"] == "majority" and len(rows) > 1
    assert {row["split"] for row in rows} == {"Cheema et al. fold 3"}
    assert {r["split"] for r in sweep.frozen_rows(str(tmp_path), 3, tmp_path / "work", baselines=False)} == {
        "seeded 8:1:1"}


class Interrupt(pl.Callback):
    """Stops a run as a killed process would, after the epoch-0 checkpoint."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            raise RuntimeError("interrupted")


def test_an_interrupted_row_resumes_from_its_last_checkpoint_and_ends_as_an_uninterrupted_one(
    sweep, tmp_path, monkeypatch
):
    """image_only, shrunk (probe epoch, then finetuning of the top blocks behind the activation cache): stopped after
    epoch 0, the row's next attempt resumes from last.ckpt and reports the same test figures, both epochs' times and
    the fit time of both attempts, as a run that was never stopped."""
    recipe = yaml.safe_load(sweep.RECIPE.read_text())
    recipe["model"]["init_args"]["encoders"]["image"]["init_args"].update(model_name="test_resnet", pretrained=False)
    recipe["data"]["init_args"].update(image_model="test_resnet", image_size=32, batch_size=8, num_workers=0)
    recipe["trainer"].update(max_epochs=2, accelerator="cpu", log_every_n_steps=1, enable_model_summary=False)
    next(c for c in recipe["trainer"]["callbacks"] if c["class_path"].endswith("LinearProbeFinetune"))[
        "init_args"].update(probe_epochs=1, warmup_steps=2)
    monkeypatch.setattr(sweep, "RECIPE", tmp_path / "recipe.yaml")
    sweep.RECIPE.write_text(yaml.safe_dump(recipe, sort_keys=False))
    monkeypatch.syspath_prepend(str(BENCHMARK.parent))  # the CLI imports mvsa_single.EpochTimes
    monkeypatch.chdir(tmp_path)
    root = str(write_mvsa(tmp_path / "mvsa", n=40))

    whole = sweep.run_trained("image_only", root, 0, tmp_path / "whole", [])
    assert whole["resumed_at_epoch"] is None and len(whole["epoch_seconds"]) == 2
    stop = ["--trainer.callbacks+=tests.test_mvsa_benchmark.Interrupt"]
    with pytest.raises(RuntimeError, match="interrupted"):
        sweep.run_trained("image_only", root, 0, tmp_path / "parts", stop)
    assert sweep.unfinished_checkpoint("image_only", 0, tmp_path / "parts").parent.parent.name == "version_0"
    resumed = sweep.run_trained("image_only", root, 0, tmp_path / "parts", [])
    assert resumed["resumed_at_epoch"] == 1 and len(resumed["epoch_seconds"]) == 2 == resumed["epochs_run"]
    assert None not in resumed["epoch_seconds"] and resumed["run_seconds"] > sum(resumed["epoch_seconds"])
    assert len(resumed["epoch_load"]) == 2 and all(load >= 0 for load in resumed["epoch_load"])  # both attempts'
    assert resumed["machine"]["torch_threads"] == torch.get_num_threads()
    # the tests run from this checkout: its commit, for the library and the benchmark alike
    commits = {resumed["revision"][key].removesuffix("+dirty") for key in ("library_commit", "benchmark_commit")}
    assert commits == {sweep.revision(BENCHMARK.parent).removesuffix("+dirty")}
    assert resumed["test"] == whole["test"] and resumed["selected_checkpoint"] == whole["selected_checkpoint"]
    assert not (tmp_path / "parts" / "runs" / "image_only-seed0" / "version_1").exists()  # one run, one directory
    assert sweep.run_trained("image_only", root, 0, tmp_path / "parts", [], fresh=True)["resumed_at_epoch"] is None

    # Training ended by early stopping, the test never ran: the next attempt tests, and trains no epoch more (even when
    # max_epochs would allow one; EarlyStopping checks again only after another epoch).
    last = sweep.unfinished_checkpoint("image_only", 0, tmp_path / "whole")
    state = torch.load(last, weights_only=False)
    stopping = next(key for key in state["callbacks"] if key.startswith("EarlyStopping"))
    state["callbacks"][stopping].update(stopped_epoch=1, wait_count=state["callbacks"][stopping]["patience"])
    torch.save(state, last)
    again = sweep.run_trained("image_only", root, 0, tmp_path / "whole", ["--trainer.max_epochs", "3"])
    assert again["epochs_run"] == 2 and again["test"] == whole["test"] and again["resumed_at_epoch"] == 2
