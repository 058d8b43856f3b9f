"""RunReport: at the end of fit, ``report.md`` and PNG plots in the run directory that explain the run."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, DistributedSampler

from ml_optim_plugins.diagnostics.curves import moving_average, param_group_lrs, spans_decades
from ml_optim_plugins.diagnostics.history import MetricHistory, Series
from ml_optim_plugins.hyperparameters import check_integer
from ml_optim_plugins.metric_names import (
    GRADCHECK_FAILED_TENSORS,
    GRADCHECK_PASSED,
    metric_key,
    parse_balance_key,
    parse_metric_key,
)

HEAD_METRICS = (("acc", "accuracy"), ("f1", "macro-F1"), ("f1_weighted", "weighted-F1"))
BALANCE_STATS = ("score", "ratio", "coefficient", "cosine", "k_multimodal", "k_unimodal")


class RunReport(Callback):
    """Make a run explain itself: at the end of fit, rank 0 writes ``report.md`` and PNG plots into the run directory.

    The report lists the run (directory, duration, steps, best checkpoint), the stages, the gradient checks, the
    balancing coefficients and a final table of the fused model's and each modality's metrics on validation (the
    epoch of the best checkpoint) and on test (from a later ``trainer.test`` with this callback attached, which
    rewrites the report). The plots (``loss.png``, ``metrics.png``, ``lr.png``, ``balancing.png``) mark the stage
    boundaries. Metrics come from a :class:`MetricHistory` added to the Trainer's loggers; the history is in
    ``state_dict``, so a resumed run reports the whole run. docs/diagnostics.md describes each part.

    Args:
        filename: name of the Markdown report in the run directory.
        smoothing: window (in logged points) of the moving average drawn over the training loss.

    Raises:
        ValueError: ``filename`` does not end in ``.md`` or ``smoothing`` is below 1 (at construction); the Trainer
            has no logger (at ``setup``).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[RunReport()], logger=True, max_epochs=1)  # doctest: +SKIP
        >>> trainer.fit(model, datamodule=data); trainer.test(ckpt_path="best")  # doctest: +SKIP
    """

    def __init__(self, filename: str = "report.md", smoothing: int = 10) -> None:
        if not filename.endswith(".md"):
            raise ValueError(f"filename={filename!r}: the report is Markdown, use a name ending in .md")
        check_integer("smoothing", smoothing, at_least=1)
        self.filename, self.smoothing = filename, smoothing
        self.history = MetricHistory()
        self.lrs: dict[str, Series] = defaultdict(list)
        self.final: dict[str, dict[str, float]] = {}
        self.final_source: dict[str, str] = {}
        self.padded: dict[str, bool] = {}  # split -> its loader padded the split under DDP
        self.fit_seconds = 0.0
        self._fit_start: float | None = None
        self._fitting = True
        self.path: Path | None = None

    # -- recording ---------------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not trainer.loggers:
            raise ValueError(
                "RunReport needs a logger: the report goes to the logger's run directory. Pass logger=True or a "
                "CSVLogger / TensorBoardLogger to the Trainer (trainer.logger in a recipe), or remove RunReport."
            )
        self._fitting = stage == "fit"
        # Only fit's curves: a trainer.validate / test before or after fit would add rows at its own step 0 or
        # global_step (its figures reach the final table through callback_metrics instead).
        self.history.recording = self._fitting
        if self.history not in trainer.loggers:
            trainer.loggers = [*trainer.loggers, self.history]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        for name, lr in param_group_lrs(trainer, optimizer).items():
            self.lrs[name].append((trainer.global_step, lr))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate":  # a validate run after fit (e.g. of the best checkpoint)
            self._take_final(trainer, "val", "trainer.validate")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        path = getattr(trainer, "ckpt_path", None)
        self._take_final(trainer, "test", f"checkpoint {Path(path).name}" if path else "the weights in memory")

    def _take_final(self, trainer: pl.Trainer, split: str, source: str) -> None:
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if _of_split(k, split) and v.numel() == 1}
        self.final[split] = {k.removesuffix("_epoch"): v for k, v in values.items()}
        self.final_source[split] = source
        self.padded[split] = _pads_samples(trainer.test_dataloaders if split == "test" else trainer.val_dataloaders)
        self.write(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fit_start is not None:
            self.fit_seconds += time.perf_counter() - self._fit_start
            self._fit_start = None
        row, source = self._selected_validation(trainer)
        if row is not None:
            self.final["val"] = {k.removesuffix("_epoch"): v for k, v in row.items() if _of_split(k, "val")}
            self.final_source["val"] = source
            self.padded["val"] = _pads_samples(trainer.val_dataloaders)
        self.write(trainer)

    def _selected_validation(self, trainer: pl.Trainer) -> tuple[dict[str, float] | None, str]:
        """The logged validation metrics of the checkpoint that fit selected (or of the last validation)."""
        rows = [(step, values) for step, values in self.history.rows if any(_of_split(k, "val") for k in values)]
        if not rows:
            return None, ""
        checkpoint = trainer.checkpoint_callback
        monitor = getattr(checkpoint, "monitor", None)
        best = getattr(checkpoint, "best_model_score", None)
        if monitor and best is not None:
            # The row that logged the best score (a validation row, or e.g. a training epoch's), then the validation
            # row of the same epoch.
            scored = [(step, values) for step, values in self.history.rows if monitor in values]
            if scored:
                _, values = min(scored, key=lambda item: abs(item[1][monitor] - float(best)))
                epoch = values.get("epoch")
                same_epoch = [v for _, v in rows if epoch is not None and v.get("epoch") == epoch]
                if same_epoch:
                    return same_epoch[-1], f"epoch {int(epoch)}, the best {monitor} ({float(best):.4f})"
        step, values = rows[-1]
        return values, f"epoch {int(values.get('epoch', -1))}, the last validation"

    # -- writing -----------------------------------------------------------------------------------------------------
    def stage_boundaries(self, trainer: pl.Trainer) -> list[dict[str, Any]]:
        """Stage boundaries (``{"name", "epoch", "step"}``) of the staged-finetuning callbacks of ``trainer``."""
        found = []
        for callback in trainer.callbacks:
            boundaries = getattr(callback, "boundaries", None)
            for boundary in boundaries if isinstance(boundaries, list) else []:
                if isinstance(boundary, Mapping) and "step" in boundary:
                    found.append(dict(boundary))
        return found

    def write(self, trainer: pl.Trainer) -> Path | None:
        """Draw the plots and write the report now (rank 0); returns the report's path."""
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        if not trainer.is_global_zero or trainer.fast_dev_run or log_dir is None:
            return None  # fast_dev_run replaces the loggers by one without a directory: no run directory to write to
        out = Path(log_dir)
        out.mkdir(parents=True, exist_ok=True)
        boundaries = self.stage_boundaries(trainer)
        plots = (self._plot_loss, self._plot_metrics, self._plot_lr, self._plot_balancing)
        figures = [figure for figure in (plot(out, boundaries) for plot in plots) if figure is not None]
        self.path = out / self.filename
        self.path.write_text(self._markdown(trainer, out, boundaries, figures))
        rank_zero_info(f"RunReport: {self.path.resolve()}")
        return self.path

    def _plot_loss(self, out: Path, boundaries: list[dict[str, Any]]) -> str | None:
        train = self.history.series(metric_key("train", "loss_step")) or self.history.series(
            metric_key("train", "loss"))
        if not train:
            return None
        window = min(self.smoothing, len(train))
        smooth = moving_average([v for _, v in train], window)
        lines = {"train (logged steps)": (train, {"alpha": 0.35}),
                 f"train ({window}-point mean)": (list(zip([s for s, _ in train][window - 1:], smooth)), {})}
        for key in sorted(self.history.keys()):
            parsed = parse_metric_key(key)
            if parsed is not None and parsed.split == "val" and parsed.metric.endswith("loss"):
                lines[key] = (self.history.series(key), {"marker": "o"})
        log_scale = spans_decades(v for series, _ in lines.values() for _, v in series)
        return _figure(out / "loss.png", [("loss", lines, log_scale)], boundaries)

    def _plot_metrics(self, out: Path, boundaries: list[dict[str, Any]]) -> str | None:
        panels = []
        for metric, title in HEAD_METRICS[:2]:
            lines = {}
            for split in ("val", "train"):
                for key in sorted(self.history.keys()):
                    parsed = parse_metric_key(key)
                    if parsed is not None and parsed.split == split and parsed.metric == metric:
                        style = {"marker": "o"} if split == "val" else {"linestyle": "--"}
                        lines[key.removesuffix("_epoch")] = (self.history.series(key), style)
            if lines:
                panels.append((title, lines, False))
        return _figure(out / "metrics.png", panels, boundaries) if panels else None

    def _plot_lr(self, out: Path, boundaries: list[dict[str, Any]]) -> str | None:
        if not self.lrs:
            return None
        lines = {name: (points, {}) for name, points in self.lrs.items()}
        return _figure(out / "lr.png", [("learning rate", lines, False)], boundaries)

    def _plot_balancing(self, out: Path, boundaries: list[dict[str, Any]]) -> str | None:
        keys = {k: parsed for k in sorted(self.history.keys()) if (parsed := parse_balance_key(k)) is not None}
        panels = []
        for stat in BALANCE_STATS:
            lines = {modality: (self.history.series(k), {}) for k, (modality, s) in keys.items() if s == stat}
            if lines:
                panels.append((stat, lines, False))
        return _figure(out / "balancing.png", panels, boundaries) if panels else None

    def _markdown(self, trainer: pl.Trainer, out: Path, boundaries: list[dict[str, Any]], figures: list[str]) -> str:
        checkpoint = trainer.checkpoint_callback
        best_path = getattr(checkpoint, "best_model_path", "") or ""
        lines = [
            f"# Run report: {out.resolve().parent.name}/{out.name}",
            "",
            f"- run directory: `{out.resolve()}` (metrics.csv, TensorBoard events, config.yaml, checkpoints)",
            f"- fit: {trainer.current_epoch} epoch(s), {trainer.global_step} optimizer step(s), "
            f"{self.fit_seconds:.1f} s of fit (a resumed run adds the time up to its checkpoint)",
        ]
        if best_path:
            score = getattr(checkpoint, "best_model_score", None)
            shown = "" if score is None else f" ({checkpoint.monitor} = {float(score):.4f})"
            lines.append(f"- best checkpoint{shown}: `{Path(best_path).name}`")
        if self.history.nonfinite:
            shown = ", ".join(f"{key} ({count}x)" for key, count in sorted(self.history.nonfinite.items()))
            lines.append(f"- **non-finite values were logged** (left out of the plots): {shown}")
        lines += ["", "## Final metrics", ""]
        lines += self._final_table() or ["No validation or test metrics were logged."]
        padded = sorted(split for split in self.final if self.padded.get(split))
        if trainer.world_size > 1 and padded:
            lines.append(
                f"- {trainer.world_size} processes: the {' and '.join(padded)} loader(s) used Lightning's distributed "
                f"sampler, which pads a split to a multiple of the process count, so up to {trainer.world_size - 1} "
                "samples were counted twice (the library's data modules shard val / test without padding)."
            )
        if boundaries:
            lines += ["", "## Stages", "", "| stage | name | from epoch | from step |", "|---|---|---|---|"]
            lines += [f"| {b.get('stage', i)} | {b.get('name', '')} | {b.get('epoch', '')} | {b['step']} |"
                      for i, b in enumerate(boundaries)]
        checks = self.history.series(GRADCHECK_PASSED)
        if checks:
            failed = dict(self.history.series(GRADCHECK_FAILED_TENSORS))
            lines += ["", "## Gradient checks", "", "| step | passed | failed tensors |", "|---|---|---|"]
            lines += [f"| {step} | {'yes' if value else 'NO'} | {failed.get(step, 0):.0f} |" for step, value in checks]
            lines.append("\nDetails: `gradcheck-epoch*.json` in the run directory.")
        coefficients = {parsed[0]: [v for _, v in self.history.series(k)] for k in sorted(self.history.keys())
                        if (parsed := parse_balance_key(k)) is not None and parsed[1] == "coefficient"}
        if coefficients:
            lines += ["", "## Balancing", "", "| modality | mean coefficient | min | last |", "|---|---|---|---|"]
            lines += [f"| {m} | {sum(v) / len(v):.3f} | {min(v):.3f} | {v[-1]:.3f} |" for m, v in coefficients.items()]
        if figures:
            lines += ["", "## Plots", ""]
            lines += [f"![{Path(name).stem}]({name})" for name in figures]
        return "\n".join(lines) + "\n"

    def _final_metrics(self, splits: Sequence[str]) -> list[tuple[str, str]]:
        """``(name, title)`` of the table's metrics: accuracy and the F1 scores, then any other metric the model
        logged as ``{split}/{name}`` (a subclass's extra torchmetrics metric, say), losses left out."""
        fused = [parsed.metric for split in splits for k in self.final[split]
                 if (parsed := parse_metric_key(k)) is not None and parsed.modality is None]
        extra = sorted({name for name in fused if "loss" not in name and name not in dict(HEAD_METRICS)})
        return [*HEAD_METRICS, *((name, name) for name in extra)]

    def _final_table(self) -> list[str]:
        splits = [split for split in ("val", "test") if self.final.get(split)]
        if not splits:
            return []
        metrics = self._final_metrics(splits)
        heads = ["fused"] + sorted({parsed.modality for split in splits for k in self.final[split]
                                   if (parsed := parse_metric_key(k)) is not None and parsed.modality is not None
                                   and parsed.metric in dict(metrics)})
        header = "| model | " + " | ".join(f"{split} {title}" for split in splits for _, title in metrics) + " |"
        rows = [header, "|---" * (1 + len(splits) * len(metrics)) + "|"]
        for head in heads:
            cells = []
            for split in splits:
                for metric, _ in metrics:
                    key = metric_key(split, metric, None if head == "fused" else head)
                    value = self.final[split].get(key)
                    cells.append("-" if value is None else f"{value:.4f}")
            rows.append(f"| {head} | " + " | ".join(cells) + " |")
        rows.append("")
        rows += [f"- {split}: {self.final_source.get(split, '')}" for split in splits]
        return rows

    # -- state -------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        running = 0.0 if self._fit_start is None else time.perf_counter() - self._fit_start
        return {"rows": list(self.history.rows), "lrs": dict(self.lrs), "fit_seconds": self.fit_seconds + running,
                "nonfinite": dict(self.history.nonfinite)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.history.rows and not self._fitting:
            return  # testing a checkpoint of this run (e.g. the best): keep the whole run's history, not the checkpoint's
        self.history.rows = [(int(step), dict(values)) for step, values in state_dict["rows"]]
        self.lrs = defaultdict(list, {k: [tuple(p) for p in v] for k, v in state_dict["lrs"].items()})
        self.fit_seconds = float(state_dict.get("fit_seconds", 0.0))
        self.history.nonfinite = dict(state_dict.get("nonfinite", {}))


def _of_split(key: str, split: str) -> bool:
    parsed = parse_metric_key(key)
    return parsed is not None and parsed.split == split


def _pads_samples(loaders: Any) -> bool:
    """Whether a loader among ``loaders`` (one, or a collection, as ``trainer.val_dataloaders`` holds) samples with a
    ``DistributedSampler`` that pads (Lightning's default for val / test), not an unrepeated one."""
    padding: list[bool] = []

    def check(loader: DataLoader) -> None:
        sampler = getattr(loader.batch_sampler, "sampler", None) or loader.sampler
        padding.append(
            isinstance(sampler, DistributedSampler) and not isinstance(sampler, UnrepeatedDistributedSampler)
        )

    apply_to_collection(loaders, DataLoader, check)
    return any(padding)


def _figure(
    path: Path, panels: Sequence[tuple[str, dict[str, tuple[Series, dict[str, Any]]], bool]], boundaries: list[dict[str, Any]]
) -> str:
    """One PNG of stacked panels ``(y label, {line label: (points, plot kwargs)}, log scale)`` sharing the step axis,
    with stage boundaries as dashed vertical lines; returns the file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, figsize=(7.5, 2.8 * len(panels) + 0.6), dpi=100, sharex=True, squeeze=False)
    for ax, (label, lines, log_scale) in zip(axes[:, 0], panels):
        for name, (points, style) in lines.items():
            if points:
                x, y = zip(*points)
                ax.plot(x, y, lw=1.3, label=name, **style)
        for boundary in boundaries[1:] if boundaries and boundaries[0]["step"] == 0 else boundaries:
            ax.axvline(boundary["step"], color="grey", linestyle=":", lw=1)
            ax.annotate(str(boundary.get("name", "")), (boundary["step"], 1), xycoords=("data", "axes fraction"),
                        xytext=(3, -10), textcoords="offset points", fontsize=7, color="grey")
        if log_scale:
            ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.legend(fontsize=7, loc="best")
    axes[-1, 0].set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name
