"""Overhead of the library's callbacks: training-step time of the quick-start model with them vs a plain loop.

Every configuration trains the quick-start model (resnet10t + packaged MiniLM, both fully trainable, concat fusion,
synthetic data, batch 32, AdamW) for ``--steps`` optimizer steps with a CSV logger (``log_every_n_steps`` 10) and no
validation. ``plain`` is Lightning alone; the others add one callback each, then all of them:

- ``WarmupDecay`` (warmup + cosine, per param group);
- ``StagedFinetuning`` with one stage in which everything trains (its per-batch bookkeeping, same work);
- ``RunReport`` + ``LearningRateMonitor`` (the history logger, LR records; plots only at the end of fit);
- ``GradientMonitor`` (gradient norms per module and modality every step for NaN/Inf, update ratios when logging);
- ``ModalityBalancer`` (OGM-GE: per-modality scores, coefficients, and Gaussian enhancement noise for every encoder
  weight: deliberate extra work of the method).

``GradientCheck`` is left out: it is deliberate extra work on one batch, measured in ``benchmarks/gradcheck.py``. A
step time is the wall time between the starts of consecutive training batches (data loading, forward, backward, every
hook and the optimizer step); the first ``--skip`` steps are left out. Configurations alternate, ``--repeats`` times,
in one process, so they see the same machine load; the table reports median step times and their ratio to ``plain``.

    python benchmarks/overhead.py                       # 25 steps, 2 repeats
    python benchmarks/overhead.py --steps 15 --repeats 1 --configs plain all
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import lightning.pytorch as pl
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from quickstart_model import quickstart_model

from ml_optim_plugins import (
    GradientMonitor,
    ModalityBalancer,
    RunReport,
    Stage,
    StagedFinetuning,
    SyntheticSentimentDataModule,
    WarmupDecay,
)


class StepTimer(pl.Callback):
    """Wall time between the starts of consecutive training batches; first in the callback list."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.fit_end = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module):
        self.starts.append(time.perf_counter())

    def steps(self, skip: int) -> list[float]:
        return [b - a for a, b in zip(self.starts[skip:], self.starts[skip + 1:])]


def callbacks_of(config: str) -> list[pl.Callback]:
    """The callbacks of one configuration (fresh instances)."""
    made = {
        "warmup": lambda: [WarmupDecay(warmup_ratio=0.1, decay="cosine")],
        "staged": lambda: [StagedFinetuning([Stage(trainable=["image", "text"], name="all")])],
        "report": lambda: [LearningRateMonitor(logging_interval="step"), RunReport()],
        "monitor": lambda: [GradientMonitor()],
        "ogm_ge": lambda: [ModalityBalancer(method="ogm_ge", alpha=0.5)],
    }
    if config == "plain":
        return []
    if config == "all":
        return [callback for make in made.values() for callback in make()]
    return made[config]()


CONFIGS = ("plain", "warmup", "staged", "report", "monitor", "ogm_ge", "all")


def run(config: str, steps: int, directory: str, seed: int = 0) -> tuple[list[float], float]:
    """Step times and the whole fit's seconds of one configuration."""
    pl.seed_everything(seed, verbose=False)
    data = SyntheticSentimentDataModule(train_size=32 * steps, val_size=32, test_size=32, batch_size=32,
                                        tokenizer="all-MiniLM-L6-v2", max_length=32)
    timer = StepTimer()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, logger=CSVLogger(directory, name=config), log_every_n_steps=10,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, callbacks=[timer, *callbacks_of(config)],
    )
    start = time.perf_counter()
    trainer.fit(quickstart_model(lr=1e-3), datamodule=data)
    return timer.steps(0), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip", type=int, default=3, help="first steps left out (warm-up)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    args = parser.parse_args()
    configs = ["plain", *[c for c in args.configs if c != "plain"]]
    steps: dict[str, list[float]] = {config: [] for config in configs}
    with tempfile.TemporaryDirectory() as directory:
        for repeat in range(args.repeats):
            for config in configs:
                times, fit_seconds = run(config, args.steps, directory)
                steps[config] += times[args.skip:]
                print(f"repeat {repeat} {config:>8}: median step {statistics.median(times[args.skip:]) * 1e3:.0f} ms, "
                      f"fit {fit_seconds:.1f} s", flush=True)
    plain = statistics.median(steps["plain"])
    print(f"\n{args.repeats} repeat(s) x {args.steps - args.skip} timed steps per configuration, batch 32, CPU")
    print("| configuration | median step (ms) | mean step (ms) | ratio to plain |")
    print("|---|---|---|---|")
    for config in configs:
        median = statistics.median(steps[config])
        print(f"| {config} | {median * 1e3:.0f} | {statistics.fmean(steps[config]) * 1e3:.0f} | {median / plain:.3f} |")


if __name__ == "__main__":
    main()
