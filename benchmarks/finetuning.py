"""Frozen-feature cache: time per epoch of a staged run of the quick-start model, with and without the cache.

Both configurations train the quick-start model (resnet10t + packaged MiniLM, concat fusion, 1,500 synthetic samples,
batch 32) with the same plan: ``--probe-epochs`` epochs with both encoders frozen (linear probe), then one epoch with
the image encoder and the top two MiniLM layers unfrozen. The cache computes the frozen encoders' features in the first
probe epoch and serves them afterwards; without it every epoch runs both encoders. Configurations alternate, repeated
``--repeats`` times, in one process, so they see the same machine load; the table reports the median epoch times and
their ratio.

    python benchmarks/finetuning.py                 # 2 repeats, 3 probe epochs
    python benchmarks/finetuning.py --train-size 600 --repeats 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning.pytorch as pl
from quickstart_model import quickstart_model

from ml_optim_plugins import LinearProbeFinetune, SyntheticSentimentDataModule, WarmupDecay


class EpochTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.times.append(time.perf_counter() - self._start)


def run(cache: bool, probe_epochs: int, train_size: int, seed: int = 0) -> tuple[list[float], dict]:
    pl.seed_everything(seed, verbose=False)
    data = SyntheticSentimentDataModule(train_size=train_size, val_size=32, test_size=32, batch_size=32,
                                        tokenizer="all-MiniLM-L6-v2", max_length=32)
    plan = LinearProbeFinetune(probe_epochs=probe_epochs, unfreeze=["image", "text[-2:]"],
                               lr_multipliers={"image": 0.3, "text": 0.3}, warmup_steps=20, cache_features=cache)
    timer = EpochTimer()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=probe_epochs + 1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[plan, WarmupDecay(warmup_ratio=0.1, decay="cosine"), timer],
    )
    trainer.fit(quickstart_model(lr=1e-3), datamodule=data)
    return timer.times, plan.cache.stats() if plan.cache is not None else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probe-epochs", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    times: dict[bool, list[list[float]]] = {True: [], False: []}
    for _ in range(args.repeats):
        for cache in (False, True):
            epochs, stats = run(cache, args.probe_epochs, args.train_size)
            times[cache].append(epochs)
            if cache:
                print(f"cache hits/misses per modality: {stats}")
    labels = [f"probe epoch {i}" for i in range(args.probe_epochs)] + ["finetune epoch"]
    print(f"\nmedian seconds per training epoch over {args.repeats} repeat(s), {args.train_size} samples, batch 32")
    print(f"| {'epoch':<16} | {'no cache':>9} | {'cache':>9} | {'speed-up':>8} |")
    print(f"|{'-' * 18}|{'-' * 11}|{'-' * 11}|{'-' * 10}|")
    for i, label in enumerate(labels):
        plain = statistics.median(run_[i] for run_ in times[False])
        cached = statistics.median(run_[i] for run_ in times[True])
        print(f"| {label:<16} | {plain:>9.2f} | {cached:>9.2f} | {plain / cached:>7.1f}x |")


if __name__ == "__main__":
    main()
