"""The Python examples of README.md and docs/ run as written."""

from __future__ import annotations

import re
import shlex
import textwrap
from pathlib import Path

import pytest

from ml_optim_plugins import ModalityAware

REPO = Path(__file__).resolve().parents[1]


def python_blocks(path: Path) -> list[str]:
    return [textwrap.dedent(block) for block in re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)]


def test_readme_callback_example_trains_and_reads_the_contract(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (block,) = python_blocks(REPO / "README.md")
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["trainer"].global_step == 3
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{'image'")]
    assert len(printed) == 3


def index_block(defining: str) -> dict:
    """Run the docs/index.md example that defines class ``defining``; return its namespace."""
    (block,) = [b for b in python_blocks(REPO / "docs" / "index.md") if f"class {defining}(" in b]
    exec(compile(block, "docs/index.md", "exec"), namespace := {})
    return namespace


@pytest.mark.parametrize("name", ["MyModel", "TwoTower"])
def test_index_contract_examples_mixin_and_by_hand_are_modality_aware(name):
    import torch

    from ml_optim_plugins.multimodal import require_modality_aware

    model = index_block(name)[name]()
    assert isinstance(model, ModalityAware) and set(model.modality_encoders()) == {"image", "text"}
    assert require_modality_aware(model, "ModalityBalancer") is model
    batch = {
        "image": torch.randn(4, 3, 8, 8),
        "text": {"input_ids": torch.randint(0, 30522, (4, 6))},
        "label": torch.tensor([0, 1, 2, 0]),
    }
    loss = model.training_step(batch, 0)
    assert loss.ndim == 0 and model.modality_logits["image"].shape == (4, 3)
    assert torch.equal(model.modality_targets, batch["label"])
    if name == "TwoTower":  # the head split: the per-modality logits add up to the fused ones
        features = [model.vision(batch["image"]), model.language(batch["text"]["input_ids"])]
        fused = model.classifier(torch.cat(features, dim=1))
        torch.testing.assert_close(sum(model.modality_logits.values()), fused.detach())


def test_index_subclass_example_runs_through_a_recipe_with_model(tiny_config, tmp_path, monkeypatch):
    """The subclass of docs/index.md, saved as my_models.py, run by the page's command on the (shrunk) quick start."""
    import torch
    import torch.nn.functional as F

    from ml_optim_plugins.cli import run

    page = REPO / "docs" / "index.md"
    (block,) = [b for b in python_blocks(page) if "class SmoothedClassifier(" in b]
    (tmp_path / "my_models.py").write_text(block)
    monkeypatch.syspath_prepend(str(tmp_path))
    (command,) = [line.strip() for line in page.read_text().splitlines() if "--model my_models." in line]
    args = shlex.split(command)
    assert args[:3] == ["PYTHONPATH=.", "ml-optim-plugins", "fit"] and args[4] == "recipes/quickstart.yaml"
    args[4] = str(tiny_config)
    cli = run([*args[2:], "--trainer.limit_train_batches", "2"])
    assert type(cli.model).__name__ == "SmoothedClassifier" and cli.model.label_smoothing == 0.2
    assert set(cli.model.encoders) == {"image", "text"}  # the recipe's model arguments are kept
    assert cli.model.hparams.label_smoothing == 0.2
    logits, targets = torch.tensor([[4.0, 0.0, 0.0], [0.0, 5.0, 0.0]]), torch.tensor([0, 1])
    assert float(cli.model.compute_loss(logits, targets)) > float(F.cross_entropy(logits, targets))  # smoothed
    assert {"test/auroc", "test/image/auroc", "test/text/auroc"} <= set(cli.trainer.callback_metrics)
    report = (Path(cli.trainer.log_dir) / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| model |"))
    assert "val auroc" in header and "test auroc" in header
    assert "-" not in table_cells(report, "fused") + table_cells(report, "image")


def table_cells(report: str, head: str) -> list[str]:
    line = next(line for line in report.splitlines() if line.startswith(f"| {head} |"))
    return [cell.strip() for cell in line.strip("|").split("|")[1:]]


def test_schedules_callback_example_runs_as_described(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    callback_block, scheduler_block = python_blocks(REPO / "docs" / "schedules.md")
    exec(compile(callback_block, "docs/schedules.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert "32 4" in printed and "{'encoder': '1e-06', 'head': '1e-05'}" in printed
    header = next((tmp_path / "runs").rglob("metrics.csv")).read_text().splitlines()[0].split(",")
    assert {"lr-AdamW/encoder", "lr-AdamW/head"} <= set(header)


def test_schedules_scheduler_example_builds_a_step_scheduler():
    _, block = python_blocks(REPO / "docs" / "schedules.md")
    namespace: dict = {}
    exec(compile(block, "docs/schedules.md", "exec"), namespace)
    import types

    import torch

    module = types.SimpleNamespace(
        parameters=lambda: [torch.nn.Parameter(torch.zeros(2))],
        trainer=types.SimpleNamespace(estimated_stepping_batches=2000),
    )
    config = namespace["configure_optimizers"](module)
    scheduler = config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    assert scheduler.schedule.total_steps == 2000 and scheduler.schedule.warmup_steps == 500


def test_schedule_figures_are_drawn_and_all_shown(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_schedule_figures", REPO / "docs" / "make_schedule_figures.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    written = script.main(tmp_path)
    assert len(written) == len(script.FIGURES) and all(p.stat().st_size > 5000 for p in written)
    page = (REPO / "docs" / "schedules.md").read_text()
    for name in script.FIGURES:
        assert f"figures/schedules/{name}.png" in page, name
        assert (REPO / "docs" / "figures" / "schedules" / f"{name}.png").is_file(), name


def test_regularization_examples_run_and_print_what_they_say(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks(REPO / "docs" / "regularization.md")
    assert len(blocks) == 5
    for block in blocks:
        exec(compile(block, "docs/regularization.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[:3] == ["1.0 0.43", "50 ['pos_drop', 'blocks.0.attn.attn_drop']", "['blocks.0.attn.attn_drop']"]
    assert "True" in printed and "['fusion.weight']" in printed


def test_gradcheck_page_example_finds_the_planted_bug_as_shown(capsys):
    page = (REPO / "docs" / "gradcheck.md").read_text()
    blocks = python_blocks(REPO / "docs" / "gradcheck.md")
    for block in blocks:
        exec(compile(block, "docs/gradcheck.md", "exec"), namespace := {})
        if "report" in namespace:
            report = namespace["report"]
    printed = capsys.readouterr().out.splitlines()
    assert printed[:2] == ["False ['encoder.bias', 'encoder.weight']", "['encoder']"]
    for line in str(report).splitlines()[1:]:  # the table shown on the page (the first line has the timing)
        assert line.split()[:4] == next(l for l in page.splitlines() if l.startswith(line.split()[0])).split()[:4]


def test_diagnostics_page_examples_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for block in python_blocks(REPO / "docs" / "diagnostics.md"):
        exec(compile(block, "docs/diagnostics.md", "exec"), {})
    assert "['loss.png', 'lr.png', 'metrics.png']" in capsys.readouterr().out.splitlines()
    (report,) = tmp_path.glob("runs/**/report.md")
    assert "test macro-F1" in report.read_text() and "| text |" in report.read_text()


def test_finetuning_examples_run_and_the_yaml_builds_the_same_plan(capsys):
    import yaml

    from ml_optim_plugins import StagedFinetuning

    page = REPO / "docs" / "finetuning.md"
    python, blocks = python_blocks(page)
    exec(compile(python, "docs/finetuning.md", "exec"), namespace := {})
    exec(compile(blocks, "docs/finetuning.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed == ["5 ['model.layer4.0.conv1.weight', 'model.layer4.0.bn1.weight']"]
    text = page.read_text()
    config = yaml.safe_load(text[text.index("```yaml") + 7:text.index("```", text.index("```yaml") + 7)])
    from_yaml = StagedFinetuning(**config["trainer"]["callbacks"][0]["init_args"])
    from_python = next(c for c in namespace["trainer"].callbacks if isinstance(c, StagedFinetuning))
    assert from_yaml.stages == from_python.stages and from_yaml.cache_features == from_python.cache_features


@pytest.mark.parametrize(
    "page",
    ["index.md", "quickstart.md", "data.md", "schedules.md", "regularization.md", "benchmarks.md", "gradcheck.md",
     "diagnostics.md", "balancing.md", "finetuning.md", "recipes.md", "methods.md", "compatibility.md",
     "baselines.md", "multi_node.md", "predict.md", "results/balancing.md"],
)
def test_docs_pages_have_no_unfilled_placeholders(page):
    assert "MEASURED_" not in (REPO / "docs" / page).read_text()


def test_method_cards_examples_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks(REPO / "docs" / "methods.md")
    assert len(blocks) >= 19  # a functional or callback example per card
    for block in blocks:
        exec(compile(block, "docs/methods.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert "[(3, 0.5)] ['train/loss', 'val/acc']" in printed
    assert "[('image', 'kNN'), ('image', 'elastic-net')]" in printed
    assert "['image', 'text'] True" in printed  # OGM-GE: the weakest modality keeps coefficient 1


def test_method_cards_live_only_in_methods_md():
    """One card per method: methods.md holds every card, the feature pages link to them instead of repeating one."""
    cards = [line for line in (REPO / "docs" / "methods.md").read_text().splitlines() if line.startswith("## ")]
    assert {"## OGM-GE", "## AGM", "## MMPareto", "## Linear probe, then finetune (LP-FT)"} <= set(cards)
    for page in sorted((REPO / "docs").rglob("*.md")):
        if page.name != "methods.md":
            headings = [line for line in page.read_text().splitlines() if line.startswith("#")]
            assert not [h for h in headings if "method card" in h.lower()], page


def markdown_anchors(text: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#{1,6} (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_docs_relative_links_resolve():
    """Every relative link of docs/ (results/ included) names an existing file and, for a page, an existing heading."""
    broken = []
    for page in sorted((REPO / "docs").rglob("*.md")):
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
            elif anchor and linked.suffix == ".md" and anchor not in markdown_anchors(linked.read_text()):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, broken


def test_predict_page_examples_classify_posts_from_a_checkpoint_alone(tiny_run, tmp_path, monkeypatch, capsys):
    """docs/predict.md's Python examples, with the tiny quick start's checkpoint at the path the page names and
    images at the page's paths; the Trainer example's data module gets the tiny run's image size and text length."""
    import csv
    import shutil

    from PIL import Image

    monkeypatch.chdir(tmp_path)
    page = REPO / "docs" / "predict.md"
    predictor_block, trainer_block = python_blocks(page)
    (checkpoint,) = re.findall(r'from_checkpoint\("([^"]+)"\)', predictor_block)
    Path(checkpoint).parent.mkdir(parents=True)
    shutil.copy(tiny_run.checkpoint, checkpoint)  # nothing else of the run: no recipe, no config
    posts = re.findall(r'\("(posts/[^"]+\.jpg)", "([^"]+)"\)', predictor_block)
    assert len(posts) == 2
    for i, (image, _) in enumerate(posts):
        Path(image).parent.mkdir(exist_ok=True)
        Image.new("RGB", (40, 40), (200 * i, 120, 40)).save(image)
    namespace: dict = {}
    exec(compile(predictor_block, "docs/predict.md", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2
    for line, prediction in zip(printed, namespace["predictions"]):
        label, probability, modalities = line.split(" ", 2)
        assert label == prediction.label in ("negative", "neutral", "positive")
        assert float(probability) == pytest.approx(max(prediction.probabilities.values()), abs=0.005)
        assert modalities.startswith("{'image': ")

    with open("new_posts.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["id", "image", "text"], *[[f"p{i}", *post] for i, post in enumerate(posts)]])
    assert "image_size=64, max_length=32" in trainer_block  # the quick start's; the tiny run's below
    exec(compile(trainer_block.replace("image_size=64, max_length=32", "image_size=32, max_length=24"),
                 "docs/predict.md", "exec"), namespace)
    assert capsys.readouterr().out.splitlines()[-1] == "2 predictions in predictions.csv"
    rows = list(csv.DictReader(open("predictions.csv")))
    assert [(row["id"], row["prediction"]) for row in rows] == [
        (f"p{i}", p.label) for i, p in enumerate(namespace["predictions"])
    ]
