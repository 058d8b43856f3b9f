"""Callbacks that add a penalty to the training objective: ElasticNetPenalty and VariationalKL."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.optim import Optimizer

from ml_optim_plugins.hyperparameters import check_integer, check_number, check_optional_number
from ml_optim_plugins.regularization.elastic_net import elastic_net_penalty, regularized_parameters
from ml_optim_plugins.regularization.variational import variational_kl, variational_modules


class PenaltyCallback(Callback):
    """Base of callbacks that add ``penalty(module)`` to the loss, acting on gradients once per optimizer step.

    In ``on_before_optimizer_step`` (after accumulation, DDP averaging and AMP unscaling, before clipping) it adds
    ``torch.autograd.grad(penalty, params)`` to the parameters' gradients, which for the optimizer is the same as
    adding the penalty to the step's mean loss (docs/regularization.md). The logged ``train/loss`` does not include
    it; the penalty is logged under its own name.

    Subclasses implement :meth:`penalty` and :meth:`select_parameters`.

    Example:
        >>> class HeadL2(PenaltyCallback):
        ...     log_name = "head_l2"
        ...     def select_parameters(self, pl_module):
        ...         return {"head.weight": pl_module.head.weight}
        ...     def penalty(self, pl_module, step):
        ...         return 1e-4 * pl_module.head.weight.pow(2).sum()
        >>> HeadL2().log_name
        'head_l2'
    """

    log_name = "penalty"

    def __init__(self) -> None:
        self._param_ids: set[int] = set()

    def select_parameters(self, pl_module: pl.LightningModule) -> dict[str, nn.Parameter]:
        """``{name: parameter}`` the penalty depends on; called once at ``on_fit_start``, before the first step."""
        raise NotImplementedError

    def penalty(self, pl_module: pl.LightningModule, step: int) -> Tensor:
        """The weighted penalty (a differentiable scalar) at optimizer step ``step``."""
        raise NotImplementedError

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Here, not in setup(): modules built in configure_model() exist only now; still before the first step.
        self._param_ids = {id(p) for p in self.select_parameters(pl_module).values()}

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        params = [
            p
            for group in optimizer.param_groups
            for p in group["params"]
            if p.requires_grad and id(p) in self._param_ids
        ]
        if not params:
            return
        with torch.enable_grad():
            value = self.penalty(pl_module, trainer.global_step)
        if value.requires_grad:
            grads = torch.autograd.grad(value, params, allow_unused=True)
            for param, grad in zip(params, grads):
                if grad is None:
                    continue
                if param.grad is None:
                    param.grad = grad.detach()
                else:
                    param.grad.add_(grad.to(param.grad.dtype))
        pl_module.log(f"train/{self.log_name}", value.detach(), on_step=True, on_epoch=False, prog_bar=False)
        self.log_extra(pl_module)

    def log_extra(self, pl_module: pl.LightningModule) -> None:
        """Hook for subclasses that log more than the penalty."""


class ElasticNetPenalty(PenaltyCallback):
    """Add an L1 + L2 penalty on chosen modules' weights to the training objective, and log it.

    ``l1 * sum |w| + l2 * sum w**2`` over the weights of ``modules`` (all by default), biases and normalisation
    weights excluded by default: lasso (``l2=0``), ridge (``l1=0``) or elastic net. The gradient is added once per
    optimizer step (see :class:`PenaltyCallback`); the value is logged as ``train/elastic_net``. Frozen parameters are
    skipped until they become trainable.

    Note that an L2 penalty is not weight decay for adaptive optimizers: with Adam the penalty's gradient is rescaled
    per weight, while AdamW's decoupled ``weight_decay`` is not (Loshchilov & Hutter 2019). Use this for L1 and elastic
    net, or for L2 with SGD, and AdamW's ``weight_decay`` for plain decay.

    Args:
        l1: weight of the L1 term (>= 0).
        l2: weight of the L2 term (>= 0).
        modules: names or globs of the modules to penalise (``["fusion"]``, ``["encoders.*"]``); ``None``: all.
        exclude_bias_and_norm: leave biases and normalisation weights out.

    Raises:
        ValueError: negative weights, both zero, or a ``modules`` entry that matches nothing (before the first step).

    Example::

        trainer = Trainer(callbacks=[ElasticNetPenalty(l1=1e-5, l2=1e-4, modules=["fusion"])])
    """

    log_name = "elastic_net"

    def __init__(
        self,
        l1: float = 0.0,
        l2: float = 0.0,
        modules: Sequence[str] | None = None,
        exclude_bias_and_norm: bool = True,
    ) -> None:
        super().__init__()
        l1, l2 = check_number("l1", l1, at_least=0), check_number("l2", l2, at_least=0)
        if l1 == 0 and l2 == 0:
            raise ValueError(f"ElasticNetPenalty needs l1 > 0 or l2 > 0, not both 0; got l1={l1}, l2={l2}")
        self.l1, self.l2 = l1, l2
        self.modules = list(modules) if modules is not None else None
        self.exclude_bias_and_norm = exclude_bias_and_norm
        self._params: list[nn.Parameter] = []

    def select_parameters(self, pl_module: pl.LightningModule) -> dict[str, nn.Parameter]:
        selected = regularized_parameters(pl_module, self.modules, self.exclude_bias_and_norm)
        if not selected:
            raise ValueError(f"ElasticNetPenalty(modules={self.modules}) selects no parameter of the module")
        self._params = list(selected.values())
        return selected

    def penalty(self, pl_module: pl.LightningModule, step: int) -> Tensor:
        return elastic_net_penalty([p for p in self._params if p.requires_grad], self.l1, self.l2)


class VariationalKL(PenaltyCallback):
    """Add the KL term of every variational dropout layer to the training objective, weighted, and log it.

    The variational objective per training sample is ``loss + KL / N`` (``N`` training samples), so by default the
    weight is ``1 / N``, read from the training dataset. A linear warm-up of the weight from 0 over ``warmup_steps``
    optimizer steps (common for sparse variational dropout) avoids pruning weights before the data term has shaped
    them. Logs ``train/kl`` (the weighted term), ``train/kl_weight`` and, for :class:`VariationalLinear` layers,
    ``train/sparsity`` (fraction of weights pruned in eval).

    Args:
        weight: weight of the summed KL; ``None``: 1 / number of training samples.
        warmup_steps: optimizer steps over which the weight grows linearly from 0.

    Raises:
        TypeError: before the first step, if the module has no variational layer (``VariationalGaussianDropout``,
            ``VariationalLinear`` or any module with a ``kl()`` method).
        ValueError: ``weight=None`` with a training set of unknown length.

    Example::

        trainer = Trainer(callbacks=[VariationalKL(warmup_steps=500)])
    """

    log_name = "kl"

    def __init__(self, weight: float | None = None, warmup_steps: int = 0) -> None:
        super().__init__()
        weight = check_optional_number("weight", weight, at_least=0)
        check_integer("warmup_steps", warmup_steps, at_least=0)
        self.weight, self.warmup_steps = weight, warmup_steps
        self.resolved_weight: float | None = weight

    def select_parameters(self, pl_module: pl.LightningModule) -> dict[str, nn.Parameter]:
        layers = variational_modules(pl_module)
        if not layers:
            raise TypeError(
                "VariationalKL found no variational layer in the module; add VariationalGaussianDropout or "
                "VariationalLinear (or any module with a kl() method)"
            )
        return {f"{name}.{p_name}": p for name, layer in layers.items() for p_name, p in layer.named_parameters()}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.weight is None:
            trainer.fit_loop.setup_data()
            loader = trainer.train_dataloader
            try:
                size = len(loader.dataset)  # type: ignore[union-attr,arg-type]
            except (AttributeError, TypeError):
                raise ValueError(
                    f"VariationalKL(weight=None) takes 1 / (number of training samples), but it cannot read that number "
                    f"from the training dataloader ({type(loader).__name__}: several loaders, or a dataset without "
                    "length); pass weight=1/N"
                ) from None
            self.resolved_weight = 1.0 / size

    def current_weight(self, step: int) -> float:
        """The KL weight at optimizer step ``step`` (after the warm-up: the full weight)."""
        assert self.resolved_weight is not None
        ramp = 1.0 if self.warmup_steps == 0 else min(1.0, step / self.warmup_steps)
        return self.resolved_weight * ramp

    def penalty(self, pl_module: pl.LightningModule, step: int) -> Tensor:
        self._last_weight = self.current_weight(step)
        return self._last_weight * variational_kl(pl_module)

    def log_extra(self, pl_module: pl.LightningModule) -> None:
        pl_module.log("train/kl_weight", self._last_weight, on_step=True, on_epoch=False)
        sparse = [m for m in variational_modules(pl_module).values() if callable(getattr(m, "sparsity", None))]
        if sparse:
            pruned = sum(m.sparsity() * m.weight.numel() for m in sparse)
            pl_module.log("train/sparsity", pruned / sum(m.weight.numel() for m in sparse), on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        return {"resolved_weight": self.resolved_weight}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.resolved_weight = state_dict["resolved_weight"]
