"""Baselines on frozen features: the scikit-learn core on synthetic features (against a reference fit), feature
extraction from the tiny model, and the ``baselines`` command on the tiny quick-start recipe."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import accuracy_score, f1_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler

from ml_optim_plugins import (
    SyntheticSentimentDataModule,
)
from ml_optim_plugins.baselines import LabelledFeatures, extract_features, fit_baselines, run_baselines
from ml_optim_plugins.baselines import C_VALUES, K_VALUES, L1_RATIOS
from ml_optim_plugins.cli import main, run

REPO = Path(__file__).resolve().parents[1]
FEATURE_SETS = ["image", "text", "image+text"]


def splits(seed: int = 0, num_classes: int = 3, sizes: tuple[int, ...] = (90, 45, 45)) -> list[LabelledFeatures]:
    """Train / val / test: ``image`` around class centres shared by the splits (separable), ``text`` pure noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 4.0, (num_classes, 6))
    out = []
    for n in sizes:
        labels = rng.permutation(np.arange(n) % num_classes)
        image, text = centres[labels] + rng.normal(size=(n, 6)), rng.normal(size=(n, 5))
        out.append(LabelledFeatures({"image": image, "text": text}, labels))
    return out


def row(results, features: str, method: str):
    (found,) = [r for r in results if (r.features, r.method) == (features, method)]
    return found


@pytest.mark.parametrize("num_classes", [2, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_separable_features_are_classified_and_noise_is_not(num_classes, seed):
    train, val, test = splits(seed, num_classes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation, convergence or metric warning escapes
        results = fit_baselines(train, val, test)
    assert [(r.features, r.method) for r in results] == [
        (f, m) for f in FEATURE_SETS for m in ("kNN", "elastic-net")
    ]
    for r in results:
        if r.method == "kNN":
            assert r.params["k"] in K_VALUES
        else:
            assert r.params["C"] in C_VALUES and r.params["l1_ratio"] in L1_RATIOS
        assert set(r.val) == set(r.test) == {"acc", "f1", "f1_weighted"}
    for method in ("kNN", "elastic-net"):
        for features in ("image", "image+text"):
            assert row(results, features, method).test["acc"] >= 0.9, (features, method)
        chance = 1.0 / num_classes
        assert row(results, "text", method).test["acc"] < chance + 0.25, method


@pytest.mark.parametrize("permutation_seed", [0, 1, 2])
def test_selection_never_looks_at_test(permutation_seed):
    train, val, test = splits(seed=3, sizes=(60, 30, 30))
    true = fit_baselines(train, val, test)
    shuffled = np.random.default_rng(permutation_seed).permutation(test.labels)
    permuted = fit_baselines(train, val, LabelledFeatures(test.features, shuffled))
    without = fit_baselines(train, val)
    for a, b, c in zip(true, permuted, without):
        assert a.params == b.params == c.params
        assert a.val == b.val == c.val and c.test is None
    # The test scores are those of the chosen model on the given test labels: a reference fit agrees exactly.
    for features in FEATURE_SETS:
        for labels, results in ((test.labels, true), (shuffled, permuted)):
            chosen = row(results, features, "kNN")
            x_train, x_test = (np.concatenate([s.features[f] for f in features.split("+")], 1) for s in (train, test))
            scaler = StandardScaler().fit(x_train)
            reference = KNeighborsClassifier(chosen.params["k"]).fit(scaler.transform(x_train), train.labels)
            predicted = reference.predict(scaler.transform(x_test))
            assert chosen.test["acc"] == pytest.approx(accuracy_score(labels, predicted))
            assert chosen.test["f1"] == pytest.approx(f1_score(labels, predicted, average="macro"))
            assert chosen.test["f1_weighted"] == pytest.approx(f1_score(labels, predicted, average="weighted"))
    assert row(permuted, "image", "kNN").test["acc"] < row(true, "image", "kNN").test["acc"]


@pytest.mark.parametrize("n_train", [4, 6, 30])
def test_k_grid_is_capped_by_the_training_size(n_train):
    train, val = splits(seed=5, sizes=(n_train, 12))
    results = fit_baselines(train, val, k_values=(3, 5, 25), c_values=(1.0,), l1_ratios=(0.5,))
    assert all(r.params["k"] in {k for k in (3, 5, 25) if k <= n_train} for r in results if r.method == "kNN")
    # Only a k beyond the data: all training samples vote.
    results = fit_baselines(train, val, k_values=(1000,), c_values=(1.0,), l1_ratios=(0.5,))
    assert [r.params for r in results if r.method == "kNN"] == [{"k": n_train}] * 3


def test_a_fit_that_stops_at_max_iter_is_noted_not_warned():
    train, val, test = splits(seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        results = fit_baselines(train, val, test, max_iter=1, c_values=(10.0,), l1_ratios=(0.1, 0.9))
    net = row(results, "image", "elastic-net")
    assert net.notes == ("2/2 fits stopped at max_iter=1 before converging, the chosen one among them",)
    assert row(results, "image", "kNN").notes == ()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: LabelledFeatures({"image": s.features["image"]}, s.labels), r"val has modalities \['image'\]"),
        (lambda s: LabelledFeatures(s.features, s.labels[:-1]), r"val features 'image' have shape \(30, 6\)"),
    ],
)
def test_inconsistent_splits_are_rejected(change, message):
    train, val, _ = splits(seed=2, sizes=(60, 30, 30))
    with pytest.raises(ValueError, match=message):
        fit_baselines(train, change(val))


def test_an_empty_grid_is_rejected():
    train, val, _ = splits(seed=2, sizes=(60, 30, 30))
    with pytest.raises(ValueError, match="c_values empty"):
        fit_baselines(train, val, c_values=())


def test_one_class_in_train_is_rejected():
    train, val, _ = splits(seed=2, sizes=(60, 30, 30))
    with pytest.raises(ValueError, match=r"train has only the classes \[1\]"):
        fit_baselines(LabelledFeatures(train.features, np.ones_like(train.labels)), val)


def test_extracted_features_have_the_encoders_sizes_and_the_split_labels(tiny_model, tiny_datamodule):
    tiny_datamodule.setup("fit")
    tiny_model.train()
    before = {name: value.clone() for name, value in tiny_model.state_dict().items()}
    features, labels = extract_features(tiny_model, tiny_datamodule.val_dataloader())
    assert {name: array.shape for name, array in features.items()} == {
        name: (16, encoder.output_dim) for name, encoder in tiny_model.encoders.items()
    }
    assert all(array.dtype == np.float32 for array in features.values())
    expected = [tiny_datamodule.datasets["val"][i]["label"] for i in range(16)]
    assert labels.tolist() == expected
    # Eval mode while extracting (deterministic, batch-norm statistics untouched); train mode restored afterwards.
    again, _ = extract_features(tiny_model, tiny_datamodule.val_dataloader())
    assert all(np.array_equal(features[name], again[name]) for name in features)
    assert tiny_model.training and all(module.training for module in tiny_model.modules())
    assert all(torch.equal(value, tiny_model.state_dict()[name]) for name, value in before.items())


def test_extract_features_needs_compute_features():
    with pytest.raises(TypeError, match="Linear has no compute_features"):
        extract_features(torch.nn.Linear(2, 2), [])


def test_command_before_and_after_fit_adds_the_trained_model(tiny_config, tmp_path, capsys):
    runs = tmp_path / "runs" / "quickstart"
    main(["baselines", "-c", str(tiny_config)])
    printed = capsys.readouterr().out
    assert "no trained model in the table" in printed and "--ckpt_path" in printed
    for features in FEATURE_SETS:
        assert re.search(rf"{re.escape(features)} +│ kNN +│ k=\d+", printed), features
        assert re.search(rf"{re.escape(features)} +│ elastic-net +│ C=[\d.]+, l1_ratio=[\d.]+", printed), features
    assert "│ trained model" not in printed
    assert not list(runs.glob("version_*")), "the command must not open a run directory"
    before = json.loads((runs / "baselines.json").read_text())
    assert before["checkpoint"] is None and before["samples"] == {"train": 32, "val": 16, "test": 16}

    cli = run(["fit", "-c", str(tiny_config), "--trainer.limit_train_batches", "1"])
    best = Path(cli.trainer.checkpoint_callback.best_model_path)
    capsys.readouterr()
    report = run_baselines(["-c", str(tiny_config)])
    printed = capsys.readouterr().out
    assert report.checkpoint == best and best.parent == runs / "version_0" / "checkpoints"
    trained = report.results[-1]
    assert (trained.features, trained.method) == ("image+text", "trained model")
    assert trained.params == {"checkpoint": best.name}
    assert all(0.0 <= trained.val[m] <= 1.0 for m in ("acc", "f1")) and 0.0 <= trained.test["acc"] <= 1.0
    assert re.search(rf"image\+text +│ trained model +│ checkpoint={re.escape(best.name)}", printed)
    # The same frozen features and the same selection as before the fit: baselines do not depend on training.
    assert [r.__dict__ for r in report.results[:-1]] == [
        {**r, "notes": tuple(r["notes"])} for r in before["results"]
    ]
    assert report.markdown_path == runs / "version_0" / "baselines.md"
    assert "| image+text | trained model |" in report.markdown_path.read_text()
    assert sorted(p.name for p in runs.iterdir()) == ["baselines.json", "baselines.md", "version_0"]


def test_without_a_test_split_only_validation_is_reported(tiny_config, tmp_path, monkeypatch, capsys):
    setup = SyntheticSentimentDataModule.setup

    def no_test(self, stage):
        setup(self, stage)
        self.datasets.pop("test")

    monkeypatch.setattr(SyntheticSentimentDataModule, "setup", no_test)
    report = run_baselines(["-c", str(tiny_config), "--output_dir", str(tmp_path / "out")])
    assert report.samples == {"train": 32, "val": 16}
    assert len(report.results) == 6 and all(r.test is None for r in report.results)
    header = report.markdown_path.read_text().splitlines()[5]
    assert report.markdown_path.parent == tmp_path / "out"
    assert "val macro-F1" in header and "test" not in header
    assert "test acc" not in capsys.readouterr().out


@pytest.mark.parametrize("where", ["command line", "recipe"])
def test_a_bad_recipe_key_exits_naming_it(tiny_config, capsys, where):
    args = ["-c", str(tiny_config)]
    if where == "command line":
        args += ["--model.init_args.no_such_option", "3"]
    else:
        config = yaml.safe_load(tiny_config.read_text())
        config["model"]["init_args"]["no_such_option"] = 3
        tiny_config.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit):
        run_baselines(args)
    assert "no_such_option" in capsys.readouterr().err


def test_a_missing_checkpoint_is_named(tiny_config, tmp_path):
    with pytest.raises(FileNotFoundError, match="--ckpt_path .*nowhere.ckpt is not a file"):
        run_baselines(["-c", str(tiny_config), "--ckpt_path", str(tmp_path / "nowhere.ckpt")])


def test_docs_example_prints_the_table_shown(capsys):
    page = (REPO / "docs" / "baselines.md").read_text()
    (block,) = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    (shown,) = re.findall(r"```text\n(.*?)```", page, flags=re.S)
    exec(compile(block, "docs/baselines.md", "exec"), {})
    assert capsys.readouterr().out.strip() == shown.strip()


def test_training_features_come_without_augmentation(tmp_path):
    """Random crops and flips of the training transform would give the baselines one random view per image."""
    from ml_optim_plugins import MVSADataModule
    from ml_optim_plugins.baselines.command import _in_order
    from tests.data.mvsa_fixture import write_mvsa

    data = MVSADataModule(str(write_mvsa(tmp_path, n=20)), image_size=16, augment=True, batch_size=8, max_length=16)
    data.setup("fit")
    first, second = (torch.cat([b["image"] for b in _in_order(data, "train")]) for _ in range(2))
    assert torch.equal(first, second)
    torch.manual_seed(0)  # two draws of the training transform (seeded: the test must not flake)
    assert not torch.equal(data.datasets["train"][0]["image"], data.datasets["train"][0]["image"])  # still augments


def test_a_checkpoint_trained_on_other_data_is_refused(tiny_config):
    cli = run(["fit", "-c", str(tiny_config), "--trainer.limit_train_batches", "1", "--test_after_fit", "false"])
    best = cli.trainer.checkpoint_callback.best_model_path
    with pytest.raises(ValueError, match=r"trained on other data .*\(seed: 1234 in the checkpoint, 99 here\); .*--data"):
        run_baselines(["-c", str(tiny_config), "--data.init_args.seed", "99"])
    # a loader-only difference is no mismatch: the same samples, batched differently
    report = run_baselines(["-c", str(tiny_config), "--data.init_args.batch_size", "4", "--ckpt_path", best])
    assert report.results[-1].method == "trained model"


def test_the_warm_started_regularisation_path_chooses_as_cold_fits_do():
    """Elastic-net settings that differ only in C are fitted along a warm-started path: same choice, same scores."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from ml_optim_plugins.baselines.core import _ELASTIC_NET, _select

    rng = np.random.default_rng(1)

    def split(n):
        y = rng.integers(0, 3, n)
        return rng.normal(0.8 * y[:, None], 1.0, (n, 6)), y

    data = {"train": split(150), "val": split(60), "test": split(60)}
    grid = [{"C": c, "l1_ratio": r} for c in (0.01, 0.1, 1.0, 10.0) for r in (0.1, 0.9)]

    def build(C, l1_ratio):  # noqa: N803 - scikit-learn's name
        return make_pipeline(StandardScaler(), LogisticRegression(C=C, l1_ratio=l1_ratio, solver="saga", max_iter=5000,
                                                                   tol=1e-6, random_state=0, **_ELASTIC_NET))

    cold = _select("x", "elastic-net", grid, build, data)
    warm = _select("x", "elastic-net", grid, build, data, path="C")
    assert warm.params == cold.params
    assert warm.test == pytest.approx(cold.test, abs=0.02)
