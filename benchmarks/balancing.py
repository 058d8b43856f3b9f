"""Modality balancing on the imbalanced synthetic data: baseline vs each method, several seeds, side by side.

Every run trains the quick-start model (resnet10t from scratch + packaged MiniLM, concat fusion, AdamW with warmup and
cosine decay) with one balancing configuration, keeps the checkpoint with the best **validation** accuracy, and
reports on the test split: fused accuracy and macro-F1, each modality's own accuracy (the fusion's head split), and a
linear probe of the weak (image) modality: a logistic regression trained on the frozen image features of the training
split, scored on the test split. Every configuration's row is printed, good or bad.

    HF_HUB_OFFLINE=1 python benchmarks/balancing.py --seeds 0 1 2
    HF_HUB_OFFLINE=1 python benchmarks/balancing.py --configs baseline "aux w=1" --epochs 2 --train-size 600
    HF_HUB_OFFLINE=1 python benchmarks/balancing.py --freeze-text     # the issue's prototype: frozen MiniLM
    HF_HUB_OFFLINE=1 python benchmarks/balancing.py --text-lr-multiplier 0.05 --epochs 10 --train-size 1500 --lr 1e-3

With ``--freeze-text`` the pretrained MiniLM stays frozen (``StagedFinetuning`` with one stage in which only the image
encoder trains: MiniLM in eval mode, its features cached after the first epoch) and only the CNN and the head learn.
With ``--text-lr-multiplier M`` MiniLM is finetuned at ``M x --lr`` (a one-stage ``StagedFinetuning`` with an LR
multiplier), the usual way to finetune a pretrained transformer beside a network trained from scratch; the text
branch then fits the training set quickly, which is what starves the image encoder. ``--optimizer sgd`` trains with
SGD + momentum as the OGM-GE reference code does; ``--text-noise`` / ``--image-noise`` change the data's imbalance.
Every run is seeded on its own, so configurations and seeds can also be split across processes (``--threads 1``,
``--results FILE`` each) and their rows combined: ``--summarize FILE [FILE ...]`` prints the table without training.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from quickstart_model import quickstart_model

from ml_optim_plugins import (
    ModalityBalancer,
    MultimodalClassifier,
    Stage,
    StagedFinetuning,
    SyntheticSentimentDataModule,
    WarmupDecay,
)

# name -> (ModalityBalancer arguments or None, auxiliary loss weight)
CONFIGS = {
    "baseline": (None, 0.0),
    "ogm_ge a=0.1": ({"method": "ogm_ge", "alpha": 0.1}, 0.0),
    "ogm_ge a=0.5": ({"method": "ogm_ge", "alpha": 0.5}, 0.0),
    "ogm a=0.5 (no GE)": ({"method": "ogm", "alpha": 0.5}, 0.0),
    "ogm_ge a=0.5 smooth, steps<=50": ({"method": "ogm_ge", "alpha": 0.5, "smooth": True, "window": (0, 50),
                                        "window_unit": "step"}, 0.0),
    "agm a=0.5": ({"method": "agm", "alpha": 0.5}, 0.0),
    "aux w=1": (None, 1.0),
    "mmpareto (aux w=1)": ({"method": "mmpareto"}, 1.0),
}


def image_features(model: MultimodalClassifier, loader: torch.utils.data.DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    feats, labels = [], []
    with torch.no_grad():
        for batch in loader:
            feats.append(model.encoders["image"](batch["image"]))
            labels.append(batch["label"])
    return torch.cat(feats), torch.cat(labels)


def linear_probe(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Multinomial logistic regression on standardised features (L-BFGS, light L2), test accuracy."""
    x, y = train
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x, x_test = (x - mean) / std, (test[0] - mean) / std
    probe = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=200)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(x), y) + 1e-3 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return (probe(x_test).argmax(-1) == test[1]).float().mean().item()


def run(name: str, seed: int, args: argparse.Namespace) -> dict[str, float]:
    balancer_args, aux = CONFIGS[name]
    pl.seed_everything(seed, verbose=False)
    data = SyntheticSentimentDataModule(train_size=args.train_size, val_size=400, test_size=400, batch_size=32,
                                        max_length=32, seed=1234, image_noise=args.image_noise,
                                        text_noise=args.text_noise)
    model = quickstart_model(lr=args.lr, aux_loss_weight=aux, optimizer=args.optimizer)
    callbacks = [WarmupDecay(warmup_ratio=0.1, decay="cosine", min_lr_ratio=0.01)]
    if args.freeze_text:
        callbacks.insert(0, StagedFinetuning([Stage(trainable=["image"], name="text frozen")], cache_features=True))
    elif args.text_lr_multiplier is not None:
        stage = Stage(trainable=["image", "text"], lr_multipliers={"text": args.text_lr_multiplier}, name="text slower")
        callbacks.insert(0, StagedFinetuning([stage]))
    if balancer_args:
        callbacks.append(ModalityBalancer(**balancer_args))
    with tempfile.TemporaryDirectory() as directory:
        best = ModelCheckpoint(dirpath=directory, monitor="val/acc", mode="max")
        trainer = pl.Trainer(accelerator="cpu", max_epochs=args.epochs, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0, callbacks=[*callbacks, best])
        start = time.perf_counter()
        trainer.fit(model, data)
        seconds = time.perf_counter() - start
        result = trainer.test(model, data, ckpt_path=best.best_model_path, verbose=False)[0]
    data.setup("fit")
    probe = linear_probe(image_features(model, data.train_dataloader()), image_features(model, data.test_dataloader()))
    return {"acc": result["test/acc"], "f1": result["test/f1"], "image": result["test/image/acc"],
            "text": result["test/text/acc"], "probe": probe, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), metavar="CONFIG")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-size", type=int, default=800)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw",
                        help="adamw (the recipes') or sgd with momentum 0.9 (the OGM-GE reference code's)")
    parser.add_argument("--threads", type=int, default=2)
    text = parser.add_mutually_exclusive_group()
    text.add_argument("--freeze-text", action="store_true", help="keep the pretrained MiniLM frozen")
    text.add_argument("--text-lr-multiplier", type=float, default=None,
                      help="finetune MiniLM at this multiple of --lr (e.g. 0.05), the CNN and head at --lr")
    parser.add_argument("--text-noise", type=float, default=0.3, help="share of corrupted text cues (data default 0.3)")
    parser.add_argument("--image-noise", type=float, default=0.3, help="share of corrupted image cues (default 0.3)")
    parser.add_argument("--results", type=Path, default=None,
                        help="also append every run's row to this JSON-lines file (to combine split runs)")
    parser.add_argument("--summarize", type=Path, nargs="+", default=None, metavar="RESULTS",
                        help="train nothing: print the table of the rows in these --results files")
    args = parser.parse_args()
    if args.summarize:
        rows: dict[str, list[dict[str, Any]]] = {}
        for path in args.summarize:
            for line in path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    rows.setdefault(row["config"], []).append(row)
        settings = {json.dumps(row["settings"], sort_keys=True) for results in rows.values() for row in results}
        if len(settings) > 1:
            raise SystemExit(f"the rows come from different settings, not one comparison: {sorted(settings)}")
        order = list(CONFIGS)
        rows = {name: sorted(rows[name], key=lambda row: row["seed"]) for name in sorted(rows, key=order.index)}
        print_table(rows, json.loads(settings.pop()) if settings else {})
        return
    torch.set_num_threads(args.threads)
    settings = {key: getattr(args, key) for key in SETTINGS}
    rows = {}
    for name in args.configs:
        for seed in args.seeds:
            row = {"config": name, "seed": seed, "settings": settings, **run(name, seed, args)}
            rows.setdefault(name, []).append(row)
            print(f"{name} seed {seed}: " + ", ".join(f"{k} {row[k]:.3f}" for k in METRICS), flush=True)
            if args.results is not None:
                with args.results.open("a") as out:
                    out.write(json.dumps(row) + "\n")
    print_table(rows, settings)


# What makes two runs comparable (everything but the configuration, the seed and the thread count).
SETTINGS = ("epochs", "train_size", "lr", "optimizer", "freeze_text", "text_lr_multiplier", "text_noise", "image_noise")
METRICS = ("acc", "f1", "image", "text", "probe", "seconds")


def print_table(rows: dict[str, list[dict[str, Any]]], settings: dict[str, Any]) -> None:
    """Mean ± std over seeds per configuration, in the order the configurations were given."""
    seeds = sorted({row["seed"] for results in rows.values() for row in results})
    print(f"\nseeds {seeds}, 400 val / 400 test; mean ± std over seeds; best checkpoint on val/acc; settings {settings}\n")
    print("| configuration | seeds | test acc | test macro-F1 | image branch acc | text branch acc | image probe acc | fit s |")
    print("|---|---|---|---|---|---|---|---|")

    def cell(values: list[float]) -> str:
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {spread:.3f}"

    for name, results in rows.items():
        cells = [cell([r[k] for r in results]) for k in METRICS[:-1]]
        print(f"| {name} | {len(results)} | " + " | ".join(cells)
              + f" | {statistics.mean(r['seconds'] for r in results):.0f} |")

if __name__ == "__main__":
    main()
