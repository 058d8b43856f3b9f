"""Staged finetuning under data parallelism: the strategies it supports, and the gradients DDP does not synchronise.

DDP registers for gradient synchronisation only the parameters that require a gradient when it wraps the model, so an
encoder frozen then and unfrozen later would train on each rank's own gradients and drift apart (docs/finetuning.md).
:class:`~ml_optim_plugins.StagedFinetuning` averages their gradients with :func:`average_gradients`, after the last
backward pass of each optimizer step.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ml_optim_plugins.rank_mean import mean_over_ranks

if TYPE_CHECKING:
    from ml_optim_plugins.finetuning.plan import FinetuningPlan

# Strategies that shard parameters across processes (staging needs whole parameters on every rank).
SHARDED_STRATEGIES = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)


def check_strategy(strategy: Any) -> None:
    """Raise a ``MisconfigurationException`` for a strategy that shards parameters: ``requires_grad``, param-group
    splits and the feature cache assume whole tensors on every rank."""
    if isinstance(strategy, SHARDED_STRATEGIES):
        raise MisconfigurationException(
            f"StagedFinetuning does not support {type(strategy).__name__} (it shards parameters); use DDP "
            "(strategy='ddp') or one device"
        )


def ddp_model(strategy: Any) -> DistributedDataParallel | None:
    """The ``DistributedDataParallel`` wrapper of the strategy's model, or ``None`` when it has none."""
    model = getattr(strategy, "model", None)
    return model if isinstance(model, DistributedDataParallel) else None


def accumulating(strategy: Any) -> bool:
    """Whether the current backward pass is an accumulation micro-batch that DDP does not synchronise: Lightning runs
    it inside DDP's ``no_sync()``, which clears ``require_backward_grad_sync`` (the flag DDP's own reducer reads)."""
    model = ddp_model(strategy)
    return model is not None and not model.require_backward_grad_sync


def average_gradients(strategy: Any, params: Sequence[nn.Parameter]) -> None:
    """Average the gradients of the trainable ``params`` over the processes of ``strategy`` (a Lightning strategy),
    in one collective, like DDP does for the parameters it registered. A parameter with a gradient on no rank keeps
    none (so the optimizer skips it: no weight decay on an unused parameter); one with a gradient on some ranks gets
    the mean with zeros for the others. Nothing happens on one process.

    Example:
        >>> from types import SimpleNamespace
        >>> layer = torch.nn.Linear(2, 1)
        >>> layer(torch.ones(1, 2)).sum().backward()
        >>> average_gradients(SimpleNamespace(world_size=1), list(layer.parameters()))
        >>> layer.weight.grad
        tensor([[1., 1.]])
    """
    params = [p for p in params if p.requires_grad]
    if getattr(strategy, "world_size", 1) < 2 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    has_grad = torch.tensor([float(p.grad is not None) for p in params], device=grads[0].device)
    *averaged, any_grad = mean_over_ranks(strategy, [*grads, has_grad])
    for p, grad, flag in zip(params, averaged, any_grad.tolist()):
        p.grad = grad if flag > 0 else None


class UnregisteredGradients:
    """The trainable parameters that DDP did not register when it wrapped the model (frozen then, unfrozen by a later
    stage), whose gradients :class:`~ml_optim_plugins.StagedFinetuning` averages itself with
    :func:`average_gradients`: after the last backward pass of each optimizer step (automatic optimization), or
    before each optimizer's step, for its own parameters (manual optimization).

    Example:
        >>> from types import SimpleNamespace
        >>> unregistered = UnregisteredGradients()
        >>> unregistered.attach(SimpleNamespace(model=torch.nn.Linear(2, 1)), plan=None)  # no DDP: nothing to do
        >>> unregistered.registered is None, unregistered.params
        (True, [])
    """

    def __init__(self) -> None:
        self.registered: set[int] | None = None  # the plan's indices of what DDP registered (None: no DDP)
        self.params: list[nn.Parameter] = []

    def attach(self, strategy: Any, plan: FinetuningPlan | None) -> None:
        """Record what DDP registered (the first stage's trainable parameters, frozen before it wrapped the model)
        and check the plan's re-freezes against DDP's ``find_unused_parameters``; nothing without DDP."""
        ddp = ddp_model(strategy)
        self.registered = None if ddp is None or plan is None else set(plan.trainable[0])
        if self.registered is not None:
            plan.check_refreeze(self.registered, bool(ddp.find_unused_parameters))

    def follow(self, plan: FinetuningPlan, trainable: Collection[int]) -> None:
        """The parameters to average by hand under the new trainable set: those DDP does not synchronise."""
        if self.registered is None:
            self.params = []
            return
        self.params = [plan.params[p] for p in sorted(set(trainable) - self.registered, key=plan.names.get)]

    def after_backward(self, trainer: Any, pl_module: Any) -> None:
        """Average at the last micro-batch of an optimizer step (DDP too waits for it), under automatic
        optimization."""
        if pl_module.automatic_optimization and not accumulating(trainer.strategy):
            self.sync(trainer, self.params)

    def before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: torch.optim.Optimizer) -> None:
        """Under manual optimization: average this optimizer's own parameters, once per step."""
        if pl_module.automatic_optimization or not self.params:
            return
        raw = getattr(optimizer, "optimizer", optimizer)
        own = {id(p) for group in raw.param_groups for p in group["params"]}
        self.sync(trainer, [p for p in self.params if id(p) in own])

    def sync(self, trainer: Any, params: list[nn.Parameter]) -> None:
        """Average ``params``' gradients over the processes of ``trainer``'s strategy."""
        average_gradients(trainer.strategy, params)
