"""The public surface: the top level's grouped ``__all__``, the names that left it (still importable for one release,
with a DeprecationWarning naming their home), ``ml_optim_plugins.functional``, and the doctests of the modules that
came out of splitting ``evaluation.py``."""

from __future__ import annotations

import ast
import doctest
import importlib
import re
import sys
import warnings
from pathlib import Path

import pytest
import yaml

import ml_optim_plugins
from ml_optim_plugins import functional

REPO = Path(__file__).resolve().parents[1]
INIT = REPO / "src" / "ml_optim_plugins" / "__init__.py"
MOVED = sorted(ml_optim_plugins._MOVED.items())


def all_groups() -> list[tuple[str, list[str]]]:
    """The ``__all__`` of ``__init__.py`` as written: ``(comment header, names)`` per group, in order."""
    tree = ast.parse(INIT.read_text())
    (node,) = [n for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "__all__"]
    lines = INIT.read_text().splitlines()[node.lineno : node.end_lineno - 1]  # between "[" and "]"
    groups: list[tuple[str, list[str]]] = []
    for line in (line.strip() for line in lines):
        if line.startswith("#"):
            groups.append((line.lstrip("# "), []))
        elif line:
            assert groups, f"{line} comes before the first group's comment header"
            groups[-1][1].extend(re.findall(r'"([^"]+)"', line))
    return groups


def test_all_is_grouped_under_headers_and_sorted_within_each_group():
    groups = all_groups()
    assert len(groups) >= 8
    for header, names in groups:
        assert names, f"group {header!r} is empty"
        assert names == sorted(names), f"group {header!r} is not sorted: {names}"
    flat = [name for _, names in groups for name in names]
    assert flat == ml_optim_plugins.__all__  # the parse saw every name, in order
    duplicates = sorted({name for name in flat if flat.count(name) > 1})
    assert not duplicates, duplicates


def test_every_exported_name_resolves_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolved = {name: getattr(ml_optim_plugins, name) for name in ml_optim_plugins.__all__}
        namespace: dict = {}
        exec("from ml_optim_plugins import *", namespace)
    assert all(value is not None for value in resolved.values())
    assert set(namespace) - {"__builtins__"} == set(ml_optim_plugins.__all__)
    assert dir(ml_optim_plugins) == sorted(ml_optim_plugins.__all__)  # dir() sorts what __dir__ lists
    assert ml_optim_plugins.functional is functional


def test_moved_names_are_neither_exported_nor_module_globals():
    assert not set(ml_optim_plugins._MOVED) & set(ml_optim_plugins.__all__)
    assert not set(ml_optim_plugins._MOVED) & set(vars(ml_optim_plugins))  # so every access goes through __getattr__


@pytest.mark.parametrize("name, home", MOVED, ids=[name for name, _ in MOVED])
def test_a_moved_name_resolves_from_the_top_level_with_a_warning_naming_its_home(name, home):
    module = importlib.import_module(home)
    assert name in getattr(module, "__all__", vars(module)), f"{home} does not export {name}"
    with pytest.warns(DeprecationWarning, match=rf"ml_optim_plugins\.{name} is deprecated.*`from {home} import {name}`"):
        value = getattr(ml_optim_plugins, name)
    assert value is getattr(module, name)
    with pytest.warns(DeprecationWarning, match=re.escape(f"from {home} import {name}")) as record:
        exec(f"from ml_optim_plugins import {name}", namespace := {})
    assert namespace[name] is value
    assert all(w.filename == "<string>" for w in record)  # the warning points at the importing line


# Every name that `from ml_optim_plugins import NAME` gave before the top level narrowed (0.1.0 and the commits since):
# each must still resolve, exported or through the deprecation shim, until the release that drops the shim.
IMPORTABLE_BEFORE = """
    BaselineReport BaselineResult COOLDOWN_SHAPES ConcatFusion CurvatureProbe DECAY_SHAPES DropoutReplacement
    ElasticNetPenalty EpochShuffle ExactResume FeatureCache Fusion GatedFusion GaussianDropout GradCheckReport
    GradientCheck GradientMonitor GradualUnfreezing HessianEigenvalues LabelledFeatures LinearProbeFinetune
    MVSADataModule ManifestDataModule ManifestError MetricHistory ModalityAware ModalityAwareMixin ModalityBalancer
    ModalityDropout MultimodalClassifier MultimodalCollate MultimodalDataModule OverfitBatchCheck PenaltyCallback
    Prediction PredictionWriter Predictor RunReport SentenceTransformerTextEncoder SplittableEncoder Stage
    StagedFinetuning SumFusion SyntheticSentimentDataModule SyntheticSentimentDataset TensorCheck TimmImageEncoder
    TrainingCurves VariationalGaussianDropout VariationalKL VariationalLinear WARMUP_SHAPES WarmupDecay WarmupDecayLR
    WarmupDecaySchedule agm_coefficients baselines_markdown baselines_table check_gradients clean_mvsa_labels
    destroy_default_process_group elastic_net_penalty encoder_blocks extract_features fit_baselines functional
    gaussian_dropout hessian_top_eigenvalue kl_kingma kl_molchanov load_tokenizer mmpareto_combine mmpareto_weights
    mmpareto_weights_from_dots modality_keep_mask modulate_gradient module_fingerprint mono_modal_losses
    nonfinite_policy ogm_ge_coefficients packaged_minilm_path read_mvsa regularized_parameters replace_dropout
    require_modality_aware resolve_text_model run_baselines seed_per_rank select_parameters training_step_loss
    true_class_scores variational_kl warmup_decay_scheduler warmup_factor
""".split()


@pytest.mark.parametrize("name", IMPORTABLE_BEFORE)
def test_every_name_the_top_level_gave_before_still_imports(name):
    assert name in ml_optim_plugins.__all__ or name in ml_optim_plugins._MOVED
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        exec(f"from ml_optim_plugins import {name}", {})


def test_an_unknown_name_is_an_attribute_error_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not hasattr(ml_optim_plugins, "no_such_name")
        with pytest.raises(AttributeError, match="module 'ml_optim_plugins' has no attribute 'no_such_name'"):
            ml_optim_plugins.no_such_name  # noqa: B018


def test_jsonargparse_writes_a_moved_class_under_its_home_without_a_warning():
    """A class given by its short name is written with the shortest import path jsonargparse finds: the new home."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch.loggers import Logger

    parser = ArgumentParser()
    parser.add_argument("--logger", type=Logger)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        config = parser.parse_args(["--logger", '{"class_path": "MetricHistory"}'])
    assert config.logger.class_path == "ml_optim_plugins.diagnostics.MetricHistory"
    with pytest.warns(DeprecationWarning, match="from ml_optim_plugins.diagnostics import MetricHistory"):
        config = parser.parse_args(["--logger", '{"class_path": "ml_optim_plugins.MetricHistory"}'])
    assert type(parser.instantiate(config).logger).__name__ == "MetricHistory"  # the old path still builds


def recipe_class_paths() -> list[tuple[str, str]]:
    found = []

    def walk(node, recipe):
        if isinstance(node, dict):
            if isinstance(node.get("class_path"), str):
                found.append((recipe, node["class_path"]))
            for value in node.values():
                walk(value, recipe)
        elif isinstance(node, list):
            for value in node:
                walk(value, recipe)

    for path in sorted((REPO / "recipes").rglob("*.yaml")):
        walk(yaml.safe_load(path.read_text()), str(path.relative_to(REPO)))
    return [(recipe, class_path) for recipe, class_path in found if class_path.startswith("ml_optim_plugins.")]


@pytest.mark.parametrize("recipe, class_path", recipe_class_paths())
def test_recipe_class_paths_resolve_without_a_warning(recipe, class_path):
    module, _, name = class_path.rpartition(".")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value = getattr(importlib.import_module(module), name)
    assert isinstance(value, type), f"{recipe}: {class_path} is not a class"


def test_functional_all_is_sorted_and_complete():
    assert functional.__all__ == sorted(set(functional.__all__))
    public = {name for name in vars(functional) if not name.startswith("_")}
    assert public == set(functional.__all__)  # nothing else is imported into the namespace
    assert len(functional.__all__) >= 15


@pytest.mark.parametrize("name", functional.__all__)
def test_functional_names_are_the_objects_of_their_home_modules(name):
    value = getattr(functional, name)
    assert callable(value) and value.__module__ != functional.__name__  # re-exported, not redefined
    assert getattr(sys.modules[value.__module__], name) is value
    subpackage = importlib.import_module(".".join(value.__module__.split(".")[:2]))
    assert name in subpackage.__all__ and getattr(subpackage, name) is value


@pytest.mark.parametrize(
    "module",
    ["ml_optim_plugins", "ml_optim_plugins.functional", "ml_optim_plugins.step_loss", "ml_optim_plugins.module_copy",
     "ml_optim_plugins.batch_slicing", "ml_optim_plugins.rank_mean", "ml_optim_plugins.logger_metrics"],
)
def test_doctests_of_the_new_modules_run(module):
    results = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert results.attempted > 0 and results.failed == 0, results


def page_table_names(page: Path, header: str) -> set[str]:
    """The backquoted names in the second column of the table of ``page`` whose header row is ``header``."""
    lines = page.read_text().splitlines()
    rows = []
    for line in lines[lines.index(header) + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(line.strip("|").split("|")[1])
    return {name for row in rows for name in re.findall(r"`([^`]+)`", row)}


def test_the_index_page_lists_the_public_api():
    page = REPO / "docs" / "index.md"
    assert page_table_names(page, "| group | names |") == set(ml_optim_plugins.__all__) - {"__version__", "functional"}
    assert page_table_names(page, "| functional | names |") == set(functional.__all__)


def test_the_index_page_functional_example_prints_what_it_says(capsys):
    page = (REPO / "docs" / "index.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", page, flags=re.S) if "ml_optim_plugins.functional" in b]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        exec(compile(block, "docs/index.md", "exec"), {})
    (shown,) = re.findall(r"# (\{.*\})", block)
    assert capsys.readouterr().out.strip() == shown
