"""The Python examples of README.md and docs/ run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ml_optim_plugins import ModalityAware

REPO = Path(__file__).resolve().parents[1]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_readme_callback_example_trains_and_reads_the_contract(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (block,) = python_blocks(REPO / "README.md")
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["trainer"].global_step == 3
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{'image'")]
    assert len(printed) == 3


def test_index_mixin_example_is_modality_aware():
    (block,) = python_blocks(REPO / "docs" / "index.md")
    namespace: dict = {}
    exec(compile(block, "docs/index.md", "exec"), namespace)
    model = namespace["MyModel"]()
    assert isinstance(model, ModalityAware) and set(model.modality_encoders()) == {"image", "text"}
    import torch

    batch = {
        "image": torch.randn(4, 3, 8, 8),
        "text": {"input_ids": torch.randint(0, 30522, (4, 6))},
        "label": torch.tensor([0, 1, 2, 0]),
    }
    loss = model.training_step(batch, 0)
    assert loss.ndim == 0 and model.modality_logits["image"].shape == (4, 3)


@pytest.mark.parametrize("page", ["index.md", "quickstart.md", "data.md"])
def test_docs_pages_have_no_unfilled_placeholders(page):
    assert "MEASURED_" not in (REPO / "docs" / page).read_text()
