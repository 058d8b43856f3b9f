"""GradientMonitor: gradient health per module and per modality, every N steps, with NaN/Inf handling."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from ml_optim_plugins.hyperparameters import check_integer, check_number
from ml_optim_plugins.logger_metrics import log_to_loggers
from ml_optim_plugins.multimodal.contract import parameter_modalities
from ml_optim_plugins.nonfinite import ON_NONFINITE, scaler_skips_nonfinite


def module_group(name: str, depth: int) -> str:
    """The module a parameter is reported under: its name cut to ``depth`` components (never the parameter itself).

    Example:
        >>> module_group("encoders.text.model.0.auto_model.encoder.layer.3.attention.self.query.weight", 2)
        'encoders.text'
        >>> module_group("head.weight", 2)
        'head'
    """
    parts = name.split(".")[:-1] or name.split(".")
    return ".".join(parts[:depth])


def grouped_grad_norms(
    named_grads: list[tuple[str, Tensor]], groups: dict[str, str], norm_type: float = 2.0
) -> dict[str, Tensor]:
    """``{group: norm of the gradients of its parameters}`` (as tensors, no host sync), from per-tensor norms."""
    per_tensor = torch.stack([torch.linalg.vector_norm(g.detach().float(), norm_type) for _, g in named_grads])
    index: dict[str, list[int]] = defaultdict(list)
    for i, (name, _) in enumerate(named_grads):
        index[groups[name]].append(i)
    return {
        group: torch.linalg.vector_norm(per_tensor[torch.tensor(rows, device=per_tensor.device)], norm_type)
        for group, rows in index.items()
    }


class GradientMonitor(Callback):
    """Log gradient health grouped by module and by modality, and catch NaN/Inf gradients before they do harm.

    In ``on_before_optimizer_step`` (the gradients the optimizer will use: after accumulation, DDP averaging and AMP
    unscaling) it checks every step that the loss and the gradients are finite and, on NaN/Inf, names the modules and
    raises ``FloatingPointError``, skips the step (weights unchanged, counted in ``grad_health/skipped_steps``) or
    warns; its ``on_nonfinite`` is the run's :func:`~ml_optim_plugins.nonfinite.nonfinite_policy`, and DDP ranks agree on the
    verdict. Every ``log_every_n_steps`` it logs ``grad_norm/{module}``, ``grad_norm/modality/{name}`` (plus
    ``shared``), ``grad_norm/total`` and ``update_ratio/{module}``, and warns once per module whose norm is below
    ``vanishing`` or above ``exploding``. docs/gradcheck.md has the details.

    Args:
        log_every_n_steps: logging interval in optimizer steps; ``None``: the Trainer's ``log_every_n_steps``.
        depth: how many components of the parameter name make a module group (2: ``encoders.image``).
        norm_type: the norm (2 = Euclidean).
        vanishing: a module whose gradient norm is below this is flagged as vanishing.
        exploding: a module whose gradient norm is above this is flagged as exploding.
        on_nonfinite: ``"raise"``, ``"skip_step"`` or ``"warn"``.
        update_ratio: also log the update-to-weight ratio ``||w_after - w_before|| / ||w_before||`` per module (keeps
            a copy of the weights on logging steps).

    Example::

        trainer = Trainer(callbacks=[GradientMonitor(log_every_n_steps=50, on_nonfinite="skip_step")])
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        depth: int = 2,
        norm_type: float = 2.0,
        vanishing: float = 1e-7,
        exploding: float = 1e3,
        on_nonfinite: str = "raise",
        update_ratio: bool = True,
    ) -> None:
        if on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite={on_nonfinite!r}; expected one of {', '.join(ON_NONFINITE)}")
        check_integer("depth", depth, at_least=1)
        if log_every_n_steps is not None:
            check_integer("log_every_n_steps", log_every_n_steps, at_least=1)
        check_number("norm_type", norm_type, above=0, allow_inf=True)  # inf: the max-norm, as in clip_grad_norm_
        check_number("vanishing", vanishing, at_least=0)
        check_number("exploding", exploding, allow_inf=True)  # inf: never flagged
        if not vanishing < exploding:
            raise ValueError(f"need 0 <= vanishing < exploding, got vanishing={vanishing}, exploding={exploding}")
        self.log_every_n_steps, self.depth, self.norm_type = log_every_n_steps, depth, norm_type
        self.vanishing, self.exploding = vanishing, exploding
        self.on_nonfinite, self.update_ratio = on_nonfinite, update_ratio
        self.skipped_steps = 0
        self.nonfinite_steps = 0
        self.flagged: set[tuple[str, str]] = set()
        self._groups: dict[str, str] = {}
        self._modalities: dict[str, str] = {}
        self._snapshot: dict[str, list[tuple[Tensor, Tensor]]] = {}
        self._names: dict[int, str] = {}
        self._loss_finite: Tensor | None = None  # whether every loss of the step's micro-batches was finite

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        names = {id(p): n for n, p in pl_module.named_parameters()}
        self._groups = {n: module_group(n, self.depth) for n in names.values()}
        self._modalities = {names[key]: modality for key, modality in parameter_modalities(pl_module).items()}
        self._names = names

    def _interval(self, trainer: pl.Trainer) -> int:
        return self.log_every_n_steps or trainer.log_every_n_steps

    def _named_grads(self, optimizer: Optimizer) -> list[tuple[str, Tensor]]:
        return [
            (self._names[id(p)], p.grad)
            for group in optimizer.param_groups
            for p in group["params"]
            if p.grad is not None and id(p) in self._names
        ]

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        finite = torch.isfinite(loss.detach()).all()  # kept on the device: checked with the gradients, one sync
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        loss_finite, self._loss_finite = self._loss_finite, None
        named = self._named_grads(optimizer)
        if not named:
            return
        norms = grouped_grad_norms(named, self._groups, self.norm_type)
        bad = (~torch.isfinite(torch.stack(list(norms.values())))).any()
        loss_bad = torch.zeros_like(bad) if loss_finite is None else ~loss_finite.to(bad.device)
        if trainer.world_size > 1:
            # Gradients are already averaged over the ranks, but a loss is each rank's own: all must skip together.
            loss_bad = trainer.strategy.reduce(loss_bad.float(), reduce_op="sum") > 0
        if bool(bad | loss_bad):
            self._nonfinite(trainer, pl_module, optimizer, norms, bool(loss_bad))
            return
        step = trainer.global_step
        if step % self._interval(trainer):
            return
        metrics = {f"grad_norm/{group}": norm for group, norm in norms.items()}
        metrics["grad_norm/total"] = torch.linalg.vector_norm(torch.stack(list(norms.values())), self.norm_type)
        if self._modalities:
            groups = {n: self._modalities.get(n, "shared") for n, _ in named}
            for modality, norm in grouped_grad_norms(named, groups, self.norm_type).items():
                metrics[f"grad_norm/modality/{modality}"] = norm
        log_to_loggers(trainer, metrics)
        self._flag(norms, step)
        if self.update_ratio:
            # Added to, not replaced: with several optimizers stepped in one batch each one's parameters are measured;
            # a parameter stepped twice keeps its first snapshot (the ratio covers the whole batch's update).
            self._snapshot = self._snapshot or defaultdict(list)
            seen = {id(p) for pairs in self._snapshot.values() for p, _ in pairs}
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None and id(p) in self._names and id(p) not in seen:
                        self._snapshot[self._groups[self._names[id(p)]]].append((p, p.detach().clone()))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._snapshot:
            return
        metrics = {}
        for group, pairs in self._snapshot.items():
            delta = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.detach() - old) for p, old in pairs]))
            weight = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(old) for _, old in pairs]))
            metrics[f"update_ratio/{group}"] = delta / weight.clamp_min(1e-12)
        log_to_loggers(trainer, metrics)
        self._snapshot = {}

    def _flag(self, norms: dict[str, Tensor], step: int) -> None:
        for group, norm in norms.items():
            value = float(norm)
            kind = "vanishing" if value < self.vanishing else "exploding" if value > self.exploding else None
            if kind and (group, kind) not in self.flagged:
                self.flagged.add((group, kind))
                bound = self.vanishing if kind == "vanishing" else self.exploding
                advice = (
                    "check for dead ReLUs, saturated activations, a too small LR or a frozen path"
                    if kind == "vanishing"
                    else "lower the LR, add warmup or gradient clipping, check the loss scale"
                )
                rank_zero_warn(f"GradientMonitor: {kind} gradients in {group!r} at step {step}: norm {value:.3g} "
                               f"({'<' if kind == 'vanishing' else '>'} {bound:g}); {advice}")

    def _nonfinite(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: Optimizer,
        norms: dict[str, Tensor],
        loss_bad: bool = False,
    ) -> None:
        self.nonfinite_steps += 1
        bad = {group: float(norm) for group, norm in norms.items() if not torch.isfinite(norm)}
        where = ", ".join(f"{group} ({value})" for group, value in bad.items())
        what = "loss and gradients" if loss_bad and bad else "loss" if loss_bad else "gradients"
        message = f"non-finite {what} at step {trainer.global_step}" + (f" in {where}" if bad else "")
        log_to_loggers(trainer, {"grad_health/nonfinite_steps": self.nonfinite_steps})
        if scaler_skips_nonfinite(trainer):
            return  # float16 AMP: the GradScaler skips this step and lowers its scale
        if self.on_nonfinite == "raise":
            raise FloatingPointError(
                f"{message}; lower the learning rate, add warmup or gradient clipping, check the inputs and the loss "
                "for NaN/Inf, or use GradientMonitor(on_nonfinite='skip_step') to skip such steps"
            )
        if self.on_nonfinite == "skip_step":
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            self.skipped_steps += 1
            log_to_loggers(trainer, {"grad_health/skipped_steps": self.skipped_steps})
            rank_zero_warn(f"GradientMonitor: {message}; step skipped (weights unchanged)")
        else:
            rank_zero_warn(f"GradientMonitor: {message}")

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps, "nonfinite_steps": self.nonfinite_steps,
                "flagged": sorted(list(f) for f in self.flagged)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = state_dict["skipped_steps"]
        self.nonfinite_steps = state_dict["nonfinite_steps"]
        self.flagged = {tuple(f) for f in state_dict["flagged"]}

