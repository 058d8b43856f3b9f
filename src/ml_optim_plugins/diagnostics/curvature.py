"""The curvature of the loss: the Hessian's extreme eigenvalues by Hessian-vector products and power iteration."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from ml_optim_plugins.batch_slicing import slice_batch
from ml_optim_plugins.hyperparameters import check_integer
from ml_optim_plugins.module_copy import detached_copy
from ml_optim_plugins.names import name_matches
from ml_optim_plugins.step_loss import (
    LossFn,
    fixed_randomness,
    require_loss_fn_under_manual_optimization,
    training_step_loss,
)


@dataclass
class HessianEigenvalues:
    """Result of :func:`hessian_top_eigenvalue`: ``top`` (largest), ``bottom`` (most negative, if asked) and the
    power-iteration steps each took.

    Example:
        >>> HessianEigenvalues(top=18.0, bottom=None, iterations=12).top
        18.0
    """

    top: float
    bottom: float | None
    iterations: int


def _power_iteration(
    hvp: Any, params: list[Tensor], shift: float, iters: int, tol: float, generator: torch.Generator
) -> tuple[float, int]:
    """Largest-magnitude eigenvalue of ``H - shift * I`` (``hvp(v)`` gives ``H v``)."""
    v = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]
    norm = torch.sqrt(sum((x * x).sum() for x in v))
    v = [x / norm for x in v]
    eigenvalue = 0.0
    for step in range(1, iters + 1):
        hv = [h - shift * x for h, x in zip(hvp(v), v)]
        new = float(sum((h * x).sum() for h, x in zip(hv, v)))
        norm = torch.sqrt(sum((h * h).sum() for h in hv))
        if norm == 0:
            return 0.0, step
        v = [h / norm for h in hv]
        if step > 1 and abs(new - eigenvalue) <= tol * max(abs(new), 1e-12):
            return new, step
        eigenvalue = new
    return eigenvalue, iters


def hessian_top_eigenvalue(
    module: nn.Module,
    batch: Any,
    loss_fn: LossFn | None = None,
    *,
    params: Sequence[str] | None = None,
    iters: int = 20,
    tol: float = 1e-3,
    bottom: bool = False,
    max_samples: int | None = None,
    seed: int = 0,
) -> HessianEigenvalues:
    """The largest eigenvalue of the loss Hessian (and optionally the most negative one) on a batch.

    Power iteration with Hessian-vector products (double backward), on a deep copy of the module in train mode with a
    fixed RNG seed (dropout masks identical at every product), so the run is not disturbed. The top eigenvalue bounds
    the stable learning rate of gradient descent (about ``2 / top``) and grows at sharp minima; a negative ``bottom``
    means the point is a saddle, not a minimum. ``bottom`` is found by power iteration on ``H - top * I``.

    Args:
        module: the model (its ``training_step`` gives the loss, or pass ``loss_fn``).
        batch: one batch.
        loss_fn: ``loss_fn(module, batch) -> scalar``.
        params: names or globs of the parameters (or of modules holding them) to restrict the Hessian to (default
            all trainable).
        iters: maximum power-iteration steps.
        tol: stop when the estimate changes by less than this, relatively.
        bottom: also estimate the most negative eigenvalue (twice the cost).
        max_samples: use only the first samples of the batch.
        seed: seed of the start vector and of the dropout masks.

    Example:
        >>> model = torch.nn.Linear(3, 1, bias=False)
        >>> x = torch.eye(3) * torch.tensor([[1.0], [2.0], [3.0]])
        >>> loss = lambda m, b: m(b).pow(2).sum()          # Hessian 2 * x^T x = diag(2, 8, 18)
        >>> round(hessian_top_eigenvalue(model, x, loss, iters=100, tol=1e-9).top, 3)
        18.0
    """
    loss_fn = loss_fn or training_step_loss
    clone = detached_copy(module)
    clone.train()
    batch = slice_batch(batch, max_samples)
    named = [(n, p) for n, p in clone.named_parameters() if p.requires_grad]
    if params is not None:
        named = [(n, p) for n, p in named if name_matches(n, params)]
    if not named:
        raise ValueError(f"params={params} selects no trainable parameter")
    tensors = [p for _, p in named]
    device = tensors[0].device
    with fixed_randomness(seed, device):
        loss = loss_fn(clone, batch)
        grads = torch.autograd.grad(loss, tensors, create_graph=True, allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, tensors)]

    def hvp(v: list[Tensor]) -> list[Tensor]:
        dot = sum((g * x).sum() for g, x in zip(grads, v) if g.requires_grad)
        if not isinstance(dot, Tensor) or not dot.requires_grad:
            return [torch.zeros_like(x) for x in v]
        out = torch.autograd.grad(dot, tensors, retain_graph=True, allow_unused=True)
        return [o.detach() if o is not None else torch.zeros_like(x) for o, x in zip(out, v)]

    generator = torch.Generator().manual_seed(seed)
    top, steps = _power_iteration(hvp, tensors, 0.0, iters, tol, generator)
    low = None
    if bottom:
        shifted, more = _power_iteration(hvp, tensors, top, iters, tol, generator)
        low, steps = shifted + top, steps + more
    return HessianEigenvalues(top, low, steps)


class CurvatureProbe(Callback):
    """Log the Hessian's top eigenvalue (and optionally the most negative) every N epochs.

    At the end of every ``every_n_epochs``-th training epoch, runs :func:`hessian_top_eigenvalue` on that epoch's
    first batch (each rank on its own; the logged value is the mean over ranks) and logs ``curvature/top_eigenvalue``
    and, with ``bottom=True``, ``curvature/bottom_eigenvalue``. Costs ``2 x iters`` backward passes (double backward)
    per probe. A top eigenvalue rising towards ``2 / lr`` warns of instability (edge of stability); comparing it across
    stages shows how sharp the minimum is.

    Args:
        every_n_epochs: probe interval.
        iters: power-iteration steps.
        bottom: also estimate the most negative eigenvalue.
        max_samples: probe on the first samples of the batch only.
        loss_fn: ``loss_fn(module, batch) -> scalar``; default: the loss ``training_step`` returns. Needed for a module
            with manual optimization (refused at fit start without it).

    Example::

        trainer = Trainer(callbacks=[CurvatureProbe(every_n_epochs=1, iters=20)])
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        iters: int = 20,
        bottom: bool = False,
        max_samples: int | None = 16,
        loss_fn: LossFn | None = None,
    ):
        check_integer("every_n_epochs", every_n_epochs, at_least=1)
        check_integer("iters", iters, at_least=2)
        self.every_n_epochs, self.iters, self.bottom, self.max_samples = every_n_epochs, iters, bottom, max_samples
        self.loss_fn = loss_fn
        self._batch: Any = None
        self.history: list[dict[str, float]] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        require_loss_fn_under_manual_optimization(pl_module, self.loss_fn, "CurvatureProbe")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            self._batch = batch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._batch is None or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        result = hessian_top_eigenvalue(
            pl_module, self._batch, iters=self.iters, bottom=self.bottom, max_samples=self.max_samples,
            loss_fn=self.loss_fn,
        )
        self._batch = None
        pl_module.log("curvature/top_eigenvalue", result.top, sync_dist=True)
        entry = {"epoch": trainer.current_epoch, "top": result.top}
        if result.bottom is not None:
            pl_module.log("curvature/bottom_eigenvalue", result.bottom, sync_dist=True)
            entry["bottom"] = result.bottom
        self.history.append(entry)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])
