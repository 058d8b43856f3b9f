"""Measure the built-in synthetic data: text-only, image-only and fused models, and the image branch inside the fused one.

Trains each model with the quick-start settings (small timm CNN, packaged MiniLM, concat fusion) for the same number of
epochs, side by side in one run, and prints a table of test accuracy and macro-F1. For the fused model it also reports
each modality's own accuracy (the head split of the concat fusion): the image branch inside the fused model scoring
below the image model trained alone is the signature of modality imbalance.

    HF_HUB_OFFLINE=1 python benchmarks/modality_imbalance.py --epochs 4 --seeds 0 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import lightning.pytorch as pl
import torch
from quickstart_model import quickstart_model

from ml_optim_plugins import MultimodalClassifier, SyntheticSentimentDataModule


def build(modalities: tuple[str, ...], args: argparse.Namespace) -> MultimodalClassifier:
    return quickstart_model(modalities, args.image_model, args.max_length, args.lr)


def train_and_test(modalities: tuple[str, ...], seed: int, args: argparse.Namespace) -> dict[str, float]:
    pl.seed_everything(seed, verbose=False)
    data = SyntheticSentimentDataModule(
        train_size=args.train_size, val_size=500, test_size=args.test_size, batch_size=32, max_length=args.max_length
    )
    model = build(modalities, args)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=args.epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - start
    result = trainer.test(model, data, verbose=False)[0]
    result["train_seconds"] = seconds
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--image-model", default="resnet10t")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--only", nargs="+", choices=["text", "image", "fused"], default=["text", "image", "fused"])
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    runs = {"text": ("text",), "image": ("image",), "fused": ("image", "text")}
    rows = []
    for name in args.only:
        results = [train_and_test(runs[name], seed, args) for seed in args.seeds]
        def mean(key: str) -> str:
            values = [r[key] for r in results if key in r]
            if not values:
                return "-"
            spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
            return f"{statistics.mean(values):.3f}{spread}"
        rows.append((name, mean("test/acc"), mean("test/f1"), mean("test/image/acc") if name == "fused" else "-",
                     mean("test/text/acc") if name == "fused" else "-", mean("train_seconds")))
        print(f"done: {name}", flush=True)
    header = ("model", "test acc", "test macro-F1", "image branch acc", "text branch acc", "train s")
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nepochs={args.epochs} train_size={args.train_size} lr={args.lr} seeds={args.seeds} image_model={args.image_model}")


if __name__ == "__main__":
    main()
