"""The baselines' rows as tables (rich for the terminal, Markdown for files) and the files the command writes."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.table import Table
from rich.text import Text

from ml_optim_plugins.baselines.core import METRICS, BaselineResult

_HEADERS = {"acc": "acc", "f1": "macro-F1", "f1_weighted": "weighted-F1"}


@dataclass(frozen=True)
class BaselineReport:
    """What :func:`~ml_optim_plugins.baselines.run_baselines` did: the rows (baselines, then the trained model if
    found) and where they went.

    Attributes:
        results: the table's rows.
        checkpoint: the trained model's checkpoint, or ``None`` when there was none to score.
        samples: samples per split (``train``, ``val`` and, if present, ``test``).
        markdown_path: the table as Markdown (``baselines.md``).
        json_path: the rows as JSON (``baselines.json``).
    """

    results: list[BaselineResult]
    checkpoint: Path | None
    samples: dict[str, int]
    markdown_path: Path
    json_path: Path


def _cells(results: Sequence[BaselineResult]) -> tuple[list[str], list[list[str]]]:
    """Header and rows shared by the terminal and Markdown tables (test columns only if some row has test)."""
    splits = ["val"] + (["test"] if any(r.test is not None for r in results) else [])
    with_notes = any(r.notes for r in results)
    header = ["features", "method", "hyperparameters"]
    header += [f"{split} {_HEADERS[m]}" for split in splits for m in METRICS] + (["notes"] if with_notes else [])

    def number(scores: Mapping[str, float | None] | None, metric: str) -> str:
        value = None if scores is None else scores.get(metric)
        return "-" if value is None else f"{value:.3f}"

    rows = []
    for r in results:
        params = ", ".join(f"{key}={value}" for key, value in r.params.items())
        row = [r.features, r.method, params] + [number(getattr(r, s), m) for s in splits for m in METRICS]
        rows.append(row + (["; ".join(r.notes)] if with_notes else []))
    return header, rows


def baselines_table(results: Sequence[BaselineResult], title: str = "baselines on frozen features") -> Table:
    """The rows as a rich :class:`~rich.table.Table` (scores to 3 decimals, ``-`` where not measured).

    Example:
        >>> row = BaselineResult("image", "kNN", {"k": 5}, {"acc": 0.9, "f1": 0.88, "f1_weighted": 0.89})
        >>> baselines_table([row]).columns[3].header
        'val acc'
    """
    header, rows = _cells(results)
    table = Table(title=title)
    for index, name in enumerate(header):
        table.add_column(name, justify="right" if 3 <= index < len(header) - (header[-1] == "notes") else "left")
    for row in rows:
        table.add_row(*map(Text, row))  # as text: a checkpoint name may hold [brackets]
    return table


def baselines_markdown(results: Sequence[BaselineResult]) -> str:
    """The rows as a Markdown table (the same cells as :func:`baselines_table`).

    Example:
        >>> row = BaselineResult("text", "kNN", {"k": 3}, {"acc": 0.5, "f1": 0.4, "f1_weighted": None})
        >>> print(baselines_markdown([row]).splitlines()[2])
        | text | kNN | k=3 | 0.500 | 0.400 | - |
    """
    header, rows = _cells(results)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def split_sizes(samples: Mapping[str, int]) -> str:
    """``"32 train, 16 val, 16 test"``: the samples of each split, for titles and the Markdown header."""
    return ", ".join(f"{size} {split}" for split, size in samples.items())


def write_report(
    results: list[BaselineResult], checkpoint: Path | None, samples: dict[str, int], output_dir: Path
) -> BaselineReport:
    """Write the rows to ``output_dir`` as ``baselines.md`` (a titled Markdown table) and ``baselines.json`` (full
    precision, with the checkpoint and the split sizes); the report of what was written."""
    output_dir.mkdir(parents=True, exist_ok=True)
    markdown, json_path = output_dir / "baselines.md", output_dir / "baselines.json"
    shown = checkpoint.resolve() if checkpoint else "none found"
    markdown.write_text(
        f"# Baselines on frozen features\n\nSamples: {split_sizes(samples)}. Trained model: {shown}.\n"
        "Hyperparameters chosen on validation macro-F1; test is only scored.\n\n" + baselines_markdown(results)
    )
    payload = {
        "checkpoint": str(checkpoint.resolve()) if checkpoint else None,
        "samples": samples,
        "results": [asdict(result) for result in results],
    }
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    return BaselineReport(results, checkpoint, samples, markdown, json_path)
