"""Modality balancing on the imbalanced synthetic data: baseline vs each method, several seeds, side by side.

Every run trains the quick-start model (resnet10t from scratch + packaged MiniLM, concat fusion, AdamW with warmup and
cosine decay) with one balancing configuration, keeps the checkpoint with the best **validation** accuracy, and
reports on the test split: fused accuracy and macro-F1, each modality's own accuracy (the fusion's head split), and a
linear probe of the weak (image) modality: a logistic regression trained on the frozen image features of the training
split, scored on the test split. Every configuration's row is printed, good or bad.

    HF_HUB_OFFLINE=1 python benchmarks/balancing.py --seeds 0 1 2
    HF_HUB_OFFLINE=1 python benchmarks/balancing.py --configs baseline "aux w=1" --epochs 2 --train-size 600
    HF_HUB_OFFLINE=1 python benchmarks/balancing.py --freeze-text     # the issue's prototype: frozen MiniLM

With ``--freeze-text`` the pretrained MiniLM stays frozen (``StagedFinetuning`` with one stage in which only the image
encoder trains: MiniLM in eval mode, its features cached after the first epoch) and only the CNN and the head learn.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

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
                                        max_length=32, seed=1234)
    model = quickstart_model(lr=args.lr, aux_loss_weight=aux)
    callbacks = [WarmupDecay(warmup_ratio=0.1, decay="cosine", min_lr_ratio=0.01)]
    if args.freeze_text:
        callbacks.insert(0, StagedFinetuning([Stage(trainable=["image"], name="text frozen")], cache_features=True))
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
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--freeze-text", action="store_true", help="keep the pretrained MiniLM frozen")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows: dict[str, list[dict[str, float]]] = {}
    for name in args.configs:
        for seed in args.seeds:
            rows.setdefault(name, []).append(run(name, seed, args))
            print(f"{name} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[name][-1].items()), flush=True)
    print(f"\n{len(args.seeds)} seeds {args.seeds}, {args.epochs} epochs, {args.train_size} training samples, "
          f"400 val / 400 test; mean ± std over seeds; best checkpoint on val/acc\n")
    print("| configuration | test acc | test macro-F1 | image branch acc | text branch acc | image probe acc | fit s |")
    print("|---|---|---|---|---|---|---|")

    def cell(values: list[float]) -> str:
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {spread:.3f}"

    for name, results in rows.items():
        cells = [cell([r[k] for r in results]) for k in ("acc", "f1", "image", "text", "probe")]
        print(f"| {name} | " + " | ".join(cells) + f" | {statistics.mean(r['seconds'] for r in results):.0f} |")


if __name__ == "__main__":
    main()
