"""BalancingMethod: the per-step work of one balancing method, run by :class:`~ml_optim_plugins.ModalityBalancer`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import lightning.pytorch as pl
from torch import Tensor, nn
from torch.optim import Optimizer

from ml_optim_plugins.nonfinite import nonfinite_policy, scaler_skips_nonfinite

#: What a method logs at a step: ``{modality: {statistic: value}}``, sent to the loggers as ``balance/{m}/{statistic}``.
Stats = dict[str, dict[str, float]]


class BalancingMethod(ABC):
    """One balancing method, as :class:`~ml_optim_plugins.ModalityBalancer` runs it.

    The balancer validates its arguments, checks the modality contract, selects each encoder's parameters, decides the
    modulation window and logs what the method returns; the method does the per-step work. Each hook below is called
    from the Lightning hook of the same name. A subclass declares:

    - ``name``: the ``ModalityBalancer(method=...)`` string that selects it;
    - ``default_parameters``: which encoder parameters it acts on unless the user says (``"weights"``, ``"all"`` or
      ``"conv"``);
    - its hyperparameters as keyword arguments of ``__init__``, named as ``ModalityBalancer``'s arguments: the balancer
      validates them and passes those that the signature names;
    - :meth:`check_module`, what it needs of the module beyond the modality contract;
    - :meth:`on_before_optimizer_step`, the step's work;
    - :meth:`state_dict` / :meth:`load_state_dict`, if it keeps state across steps (plain data).

    Attributes:
        modalities: the module's modalities, in the order of ``modality_encoders()`` (set by :meth:`setup`).
        params: each modality's selected encoder parameters (set by :meth:`setup`).

    Example:
        >>> import torch
        >>> class Halve(BalancingMethod):  # halves every selected encoder gradient of the optimizer's step
        ...     name = "halve"
        ...     def on_before_optimizer_step(self, trainer, pl_module, optimizer, owned, in_window):
        ...         for name in self.modalities:
        ...             for p in self.params[name]:
        ...                 if in_window and p.grad is not None and id(p) in owned:
        ...                     p.grad = p.grad / 2
        ...         return None
        >>> weight = torch.nn.Parameter(torch.ones(2))
        >>> weight.grad = torch.ones(2)
        >>> method = Halve()
        >>> method.setup(["image"], {"image": [weight]})
        >>> method.on_before_optimizer_step(None, None, None, {id(weight)}, in_window=True)
        >>> weight.grad
        tensor([0.5000, 0.5000])
    """

    name: ClassVar[str]
    default_parameters: ClassVar[str] = "weights"

    def __init__(self) -> None:
        self.modalities: list[str] = []
        self.params: dict[str, list[nn.Parameter]] = {}

    def check_module(self, module: pl.LightningModule) -> None:
        """At fit start, before the encoders are read: raise ``TypeError`` / ``ValueError`` saying what to add if the
        module lacks something the method needs beyond the modality contract. Accepts any module by default."""

    def setup(self, modalities: Sequence[str], params: Mapping[str, Sequence[nn.Parameter]]) -> None:
        """At fit start: the module's modalities and each one's selected encoder parameters (at least one each)."""
        self.modalities = list(modalities)
        self.params = {name: list(params[name]) for name in self.modalities}

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        """Before each backward pass inside the modulation window, while the loss's graph exists. Does nothing by
        default."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After each training batch (a micro-batch under gradient accumulation). Does nothing by default."""

    @abstractmethod
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer, owned: set[int], in_window: bool
    ) -> Stats | None:
        """Once per optimizer step, after backward, accumulation, DDP's averaging and AMP's unscaling: change the
        ``.grad`` of the selected parameters whose ``id`` is in ``owned`` (this optimizer's), only if ``in_window``.

        Returns:
            The statistics to log per modality, or ``None`` when the step was left alone.
        """

    def state_dict(self) -> dict[str, Any]:
        """Plain data to resume from (saved in the balancer's entry of a checkpoint). Nothing by default."""
        return {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s keys; a checkpoint may hold more keys (another method's). Nothing by
        default."""


def refuse_nonfinite_step(trainer: pl.Trainer, what: str) -> None:
    """Leave a step with non-finite ``what`` unbalanced, and stop the run unless its policy skips such steps.

    Returns when float16 AMP's scaler skips the step itself or the run's policy
    (:func:`~ml_optim_plugins.nonfinite.nonfinite_policy`) is ``"skip_step"`` or ``"warn"``.

    Raises:
        FloatingPointError: under the default policy ``"raise"``, naming ``what`` and the step.
    """
    if scaler_skips_nonfinite(trainer) or nonfinite_policy(trainer) != "raise":
        return
    raise FloatingPointError(
        f"ModalityBalancer: non-finite {what} at step {trainer.global_step}; the step is not balanced. Lower the "
        "learning rate, check the inputs and the loss for NaN/Inf, or attach GradientMonitor(on_nonfinite="
        "'skip_step') to skip such steps"
    )
