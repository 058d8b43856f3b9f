"""MMPareto as a balancing method: each encoder's multimodal and unimodal gradients, combined without conflict."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ml_optim_plugins.balancing.method import BalancingMethod, Stats, refuse_nonfinite_step
from ml_optim_plugins.balancing.mmpareto import mmpareto_combine, mmpareto_weights_from_dots
from ml_optim_plugins.rank_mean import mean_over_ranks
from ml_optim_plugins.lightning_internals import optimizer_unscales_in_step


class MMPareto(BalancingMethod):
    """MMPareto: before each backward pass, each encoder's gradient of its own unimodal loss; at the optimizer step,
    the multimodal part is the rest of the encoder's gradient, and the two are combined per encoder
    (:func:`~ml_optim_plugins.balancing.mmpareto_weights_from_dots`) and per tensor
    (:func:`~ml_optim_plugins.functional.mmpareto_combine`).

    Needs a module with ``aux_loss_weight > 0`` that records ``modality_losses = {modality: loss}`` in its training
    step (``MultimodalClassifier(aux_loss_weight=1.0)``). Heads and fusion keep their plain gradients.

    Args:
        gamma: the final gradient scale.
    """

    name = "mmpareto"
    default_parameters = "all"

    def __init__(self, gamma: float = 1.5) -> None:
        super().__init__()
        self.gamma = gamma
        # The unimodal gradients of the current batch, by modality and id(parameter), until their optimizer step.
        self._unimodal: dict[str, dict[int, Tensor]] = {}
        self._stepped = False  # an optimizer step happened in the current batch

    def check_module(self, module: pl.LightningModule) -> None:
        if not getattr(module, "aux_loss_weight", 0):
            raise ValueError(
                "ModalityBalancer('mmpareto') combines each encoder's multimodal and unimodal gradients, so the module "
                "needs unimodal losses and their weight in the objective: MultimodalClassifier(aux_loss_weight=1.0) "
                "(the reference weighs them 1), or, in your own module, an aux_loss_weight attribute and "
                "self.modality_losses = {modality: loss} set in training_step"
            )

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        losses = getattr(pl_module, "modality_losses", None) or {}
        missing = [name for name in self.modalities if name not in losses]
        if missing:
            raise RuntimeError(
                f"ModalityBalancer('mmpareto'): the training step recorded no unimodal loss for {missing} in "
                "modality_losses; MultimodalClassifier records them when aux_loss_weight > 0, your own module must set "
                "self.modality_losses = {modality: loss} (with its graph) in training_step"
            )
        # The unimodal gradient of each encoder, unscaled like the gradients the optimizer step will see: AMP's loss
        # scale (kept against fp16 underflow) and Lightning's 1/accumulate_grad_batches are divided out again.
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        accumulate = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
        for name in self.modalities:
            params = [p for p in self.params[name] if p.requires_grad]
            if not params:
                continue
            grads = torch.autograd.grad(losses[name] * scale, params, retain_graph=True, allow_unused=True)
            buffer = self._unimodal.setdefault(name, {})
            for p, g in zip(params, grads):
                if g is not None:
                    g = g / (scale * accumulate)
                    buffer[id(p)] = g if id(p) not in buffer else buffer[id(p)] + g

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._stepped:  # unimodal gradients of parameters no optimizer stepped in this batch are stale
            self._unimodal, self._stepped = {}, False

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer, owned: set[int], in_window: bool
    ) -> Stats | None:
        self._stepped = True
        if not self._unimodal or not in_window:
            self._unimodal = {}
            return None
        weight = float(pl_module.aux_loss_weight)
        # This optimizer's parameters take (and consume) their unimodal gradients; another optimizer's stay for its step.
        entries = [(row, p, self._unimodal.get(name, {}).pop(id(p), None)) for row, name in enumerate(self.modalities)
                   for p in self.params[name] if p.grad is not None and id(p) in owned]
        if not entries:
            return None
        # The unimodal task's gradient as it enters the objective (aux_loss_weight x its loss's gradient).
        unimodal = [weight * g if g is not None else torch.zeros_like(p.grad) for _, p, g in entries]
        # DDP averaged the total gradients; average the unimodal parts the same way.
        unimodal = mean_over_ranks(trainer.strategy, unimodal)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled() and optimizer_unscales_in_step(optimizer):
            # Fused optimizers unscale inside their step: the gradients here still carry AMP's loss scale.
            scale = scaler.get_scale()
            unimodal = [g * scale for g in unimodal]
        checks = torch.stack([x.float().sum() for (_, p, _), g in zip(entries, unimodal) for x in (p.grad, g)])
        if not bool(torch.isfinite(checks).all()):
            refuse_nonfinite_step(trainer, "multimodal or unimodal gradients")
            return None
        return self._combine(entries, unimodal)

    def _combine(self, entries: list[tuple[int, nn.Parameter, Tensor | None]], unimodal: list[Tensor]) -> Stats:
        """Replace each entry's gradient by the combination of its multimodal and unimodal parts; the statistics."""
        device = entries[0][1].grad.device
        dots = torch.zeros(len(self.modalities), 5, device=device,
                           dtype=torch.float32 if device.type == "mps" else torch.float64)
        multimodal = []
        for (row, p, _), g_u in zip(entries, unimodal):
            g_mm = p.grad - g_u
            multimodal.append(g_mm)
            a, b = g_mm.to(dots.dtype).reshape(-1), g_u.to(dots.dtype).reshape(-1)
            dots[row, :3] += torch.stack([a @ a, b @ b, a @ b])
        weights = {name: mmpareto_weights_from_dots(*values[:3]) for name, values in zip(self.modalities, dots.tolist())}
        for (row, p, _), g_mm, g_u in zip(entries, multimodal, unimodal):
            k_mm, k_u, _ = weights[self.modalities[row]]
            new = mmpareto_combine(p.grad, g_mm, g_u, k_mm, k_u, self.gamma)
            dots[row, 3] += p.grad.to(dots.dtype).pow(2).sum()
            dots[row, 4] += new.to(dots.dtype).pow(2).sum()
            p.grad = new
        norms = dots[:, 3:].sqrt().tolist()
        rows = {row for row, _, _ in entries}  # modalities with trainable, used parameters (not a frozen encoder)
        return {
            name: {"cosine": weights[name][2], "k_multimodal": weights[name][0], "k_unimodal": weights[name][1],
                   "grad_norm_before": norms[row][0], "grad_norm_after": norms[row][1]}
            for row, name in enumerate(self.modalities) if row in rows
        }

    def state_dict(self) -> dict[str, Any]:
        return {"stepped": self._stepped}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self._stepped = state_dict["stepped"]
