"""Run by test_ddp.py and tests/test_multi_node.py as ``python ddp_evaluation.py OUT_DIR MODE DEVICES [NODES]``:
``MultimodalClassifier`` on tiny synthetic data with ``strategy="ddp"`` on CPU (gloo); each process writes
``rank{global_rank}.json``.

MODE ``metrics``: no dropout, and the image encoder's BatchNorm keeps its statistics frozen, so the run is a function of
the global batches only: ``DEVICES * NODES`` processes of 8 / (DEVICES * NODES) samples per batch see the same global
batches as one process of 8 (Lightning's distributed sampler, one permutation for every process count). Validation
and test splits have an odd number of samples (7 and 5), so padded duplicates or a mean of rank means would show. Each
process records the metrics after every validation, the test metrics, the final weights and its place in the cluster.

MODE ``noise``: Gaussian dropout in the fusion, modality dropout and a dropout in the text encoder; each process
records the noise each of them drew at the first training step.

NODES > 1: the processes are started by the caller, one per node, with a cluster launcher's environment variables."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from ml_optim_plugins import (
    ConcatFusion,
    GaussianDropout,
    ModalityDropout,
    MultimodalClassifier,
    SyntheticSentimentDataModule,
)
from ml_optim_plugins.process_group import destroy_default_process_group

GLOBAL_BATCH = 8
VOCAB = 30522  # all-MiniLM-L6-v2's tokenizer


class FrozenStatsCNN(nn.Module):
    """Conv + BatchNorm whose running statistics never change (kept in eval, as a frozen encoder's BatchNorm is)."""

    output_dim = 6

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.norm.running_mean.uniform_(-0.1, 0.1)
        self.norm.running_var.uniform_(0.5, 1.5)
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, self.output_dim))
        self.norm.eval()  # Lightning keeps the modes it finds at fit start; train() keeps it in eval afterwards

    def train(self, mode: bool = True) -> FrozenStatsCNN:
        super().train(mode)
        self.norm.eval()
        return self

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.norm(self.conv(images)))


class TokenAverage(nn.Module):
    """Mean of token embeddings over the attention mask (padding-independent), with an optional dropout."""

    output_dim = 8

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, self.output_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, text: dict[str, Tensor]) -> Tensor:
        mask = text["attention_mask"].unsqueeze(-1).to(self.embed.weight.dtype)
        return self.dropout((self.embed(text["input_ids"]) * mask).sum(1) / mask.sum(1))


def tiny_data(processes: int) -> SyntheticSentimentDataModule:
    return SyntheticSentimentDataModule(
        train_size=16, val_size=7, test_size=5, image_size=16, batch_size=GLOBAL_BATCH // processes, max_length=12
    )


def tiny_model(noise: bool) -> MultimodalClassifier:
    return MultimodalClassifier(
        {"image": FrozenStatsCNN(), "text": TokenAverage(dropout=0.3 if noise else 0.0)},
        fusion=ConcatFusion(dropout=GaussianDropout(0.4) if noise else 0.0),
        num_classes=3,
        optimizer=lambda groups: torch.optim.SGD(groups, lr=0.5),
        modality_dropout=ModalityDropout(0.5) if noise else None,
    )


def scalars(metrics: dict[str, Tensor]) -> dict[str, float]:
    return {key: float(value) for key, value in sorted(metrics.items())}


class ValidationRecorder(pl.Callback):
    """The metrics Lightning holds after each validation (sanity check off): what loggers and callbacks read."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epochs.append(scalars(trainer.callback_metrics))


class NoiseRecorder(pl.Callback):
    """The noise of the first training step: Gaussian-dropout factors, modality keep masks, text-dropout mask."""

    def __init__(self) -> None:
        self.noise: dict[str, list] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        def record(name: str, noise_of):
            def hook(module: nn.Module, inputs: tuple, output) -> None:
                if trainer.global_step == 0 and name not in self.noise and module.training:
                    self.noise[name] = noise_of(inputs[0], output)

            return hook

        factors = lambda x, y: torch.where(x != 0, y / x, torch.zeros_like(x)).flatten().tolist()  # 0: dropped before
        pl_module.fusion.dropout.register_forward_hook(record("gaussian", factors))
        pl_module.modality_dropout.register_forward_hook(
            record("modality", lambda x, y: {m: (y[m] != 0).any(1).tolist() for m in sorted(y)})
        )
        text_dropout = pl_module.encoders["text"].dropout
        text_dropout.register_forward_hook(record("text", lambda x, y: (y != 0).flatten().tolist()))


if __name__ == "__main__":
    out, mode, devices = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    nodes = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    pl.seed_everything(0)
    recorder = ValidationRecorder() if mode == "metrics" else NoiseRecorder()
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, num_nodes=nodes, strategy="ddp", max_epochs=2 if mode == "metrics" else 1,
        limit_train_batches=None if mode == "metrics" else 1, limit_val_batches=None if mode == "metrics" else 0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[recorder],
    )
    model = tiny_model(noise=mode == "noise")
    data = tiny_data(devices * nodes)
    trainer.fit(model, datamodule=data)
    after_fit = scalars(trainer.callback_metrics)  # the last validation's and the last training epoch's
    result: dict = {
        "global_rank": trainer.global_rank, "node_rank": trainer.node_rank, "local_rank": trainer.local_rank,
        "world_size": trainer.world_size, "num_nodes": trainer.num_nodes,
        "environment": type(trainer.strategy.cluster_environment).__name__,
    }
    if mode == "metrics":
        (tested,) = trainer.test(model, datamodule=data, verbose=False)
        result.update(
            validations=recorder.epochs, after_fit=after_fit, test=tested,
            weights={name: p.detach().flatten().tolist() for name, p in model.named_parameters()},
        )
    else:
        result["noise"] = recorder.noise
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
    destroy_default_process_group()  # before exit: gloo threads at interpreter shutdown abort the process
