"""ModalityBalancer: slow down the dominant modality's encoder so the weaker one trains too."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer

from ml_optim_plugins.balancing.method import BalancingMethod, Stats
from ml_optim_plugins.balancing.mmpareto_method import MMPareto
from ml_optim_plugins.balancing.modulation import AGM, OGM, OGMGE
from ml_optim_plugins.hyperparameters import check_integer, check_number, check_optional_number
from ml_optim_plugins.logger_metrics import log_to_loggers
from ml_optim_plugins.metric_names import balance_key
from ml_optim_plugins.multimodal.contract import MODALITY_SCORINGS, require_modality_aware

#: The balancing method of each ``method`` name; a new method is one more :class:`BalancingMethod` subclass here.
METHODS: dict[str, type[BalancingMethod]] = {cls.name: cls for cls in (OGMGE, OGM, AGM, MMPareto)}
PARAMETER_KINDS = ("all", "weights", "conv")


def _selected(param: nn.Parameter, kinds: str) -> bool:
    if kinds == "all":
        return True
    if kinds == "weights":
        return param.dim() >= 2
    return param.dim() == 4  # "conv": the reference code's choice (4-D convolution kernels only)


def _check_clamp(clamp: Sequence[float]) -> tuple[float, float]:
    try:
        if len(clamp) != 2:
            raise ValueError("two values")
        return check_number("low", clamp[0], above=0, at_most=1), check_number("high", clamp[1], at_least=1)
    except (TypeError, ValueError) as err:
        raise ValueError(f"clamp must be (low, high) with 0 < low <= 1 <= high, got {clamp} ({err})") from None


def _ignored_arguments(method: str, given: dict[str, Any]) -> list[str]:
    """The method hyperparameters in ``given`` (checked values) that ``method`` does not take but that differ from their
    default, each as ``"name=value (used by ...)"``: set by the user for another method, and silently without effect
    otherwise."""
    defaults = inspect.signature(ModalityBalancer.__init__).parameters
    takes = {m: inspect.signature(cls).parameters for m, cls in METHODS.items()}
    return [
        f"{name}={value!r} (used by {', '.join(m for m in METHODS if name in takes[m])})"
        for name, value in given.items()
        if name not in takes[method] and value != defaults[name].default
    ]


class ModalityBalancer(Callback):
    """Balances the modalities of a multimodal model by changing its encoders' gradients at each optimizer step.

    Works on any module with the modality contract (:class:`~ml_optim_plugins.ModalityAware`). ``method`` chooses
    the balancing method:

    - ``"ogm_ge"`` / ``"ogm"`` (OGM-GE / OGM, Peng et al. CVPR 2022): scales the gradients of the modalities that are
      ahead (summed true-class probabilities) down, with (``"ogm_ge"``) or without Gaussian noise;
    - ``"agm"`` (AGM, Li et al. ICCV 2023): slows a modality that is further ahead than usual (mean cross-entropies
      against their running means) and speeds up one that lags;
    - ``"mmpareto"`` (MMPareto, Wei & Hu ICML 2024): combines each encoder's multimodal and unimodal gradients without
      conflict; needs the module's unimodal losses (``MultimodalClassifier(aux_loss_weight=1.0)``).

    It acts in ``on_before_optimizer_step`` (after gradient accumulation, DDP's averaging and AMP's unscaling, before
    clipping), once per optimizer step and on that optimizer's parameters only; ``"mmpareto"`` also in
    ``on_before_backward`` (one extra backward pass per encoder). Statistics are all-reduced under DDP, so every rank
    applies the same change. Every ``log_every_n_steps`` it logs ``balance/{modality}/{statistic}``: ``score``,
    ``ratio``, ``coefficient``, ``grad_norm_before``, ``grad_norm_modulated``, ``noise_norm``, ``grad_norm_after``
    (MMPareto: ``cosine``, ``k_multimodal``, ``k_unimodal``, ``grad_norm_before``, ``grad_norm_after``); the last
    step's are in :attr:`last`. docs/balancing.md has a card per method.

    Args:
        method: ``"ogm_ge"``, ``"ogm"``, ``"agm"`` or ``"mmpareto"``.
        alpha: modulation strength of OGM, OGM-GE and AGM (tuned per dataset in the papers: sweep it).
        smooth: OGM / OGM-GE: the continuous coefficient ``1 - tanh(alpha * (rho - 1))`` instead of the reference's
            discontinuous one.
        window: ``(first, last)`` epoch or step (inclusive) during which to balance; ``None``: always.
        window_unit: ``"epoch"`` or ``"step"``.
        parameters: which encoder parameters to change: ``"weights"`` (tensors of 2 or more dimensions), ``"all"`` or
            ``"conv"`` (4-D kernels only); ``None``: the method's default (``"all"`` for MMPareto, ``"weights"``
            otherwise).
        seed: OGM-GE: seed of the noise.
        log_every_n_steps: logging interval; ``None``: the Trainer's.
        clamp: AGM: ``(low, high)`` bounds of the coefficients; ``None``: unbounded.
        gamma: MMPareto: the final gradient scale.
        scores: how per-modality predictions are obtained (``"auto"``, ``"head_split"``, ``"masking"``,
            ``"aux_heads"``; see :meth:`~ml_optim_plugins.ModalityAwareMixin.set_modality_scoring`); ``None`` leaves
            the module's choice.
        max_gap: AGM: the cap on ``t_u - r_u`` before ``alpha`` (see :func:`~ml_optim_plugins.functional.agm_coefficients`);
            ``None``: no cap.

    An argument that the chosen method does not use (``alpha`` with ``"mmpareto"``, ``gamma`` with ``"ogm_ge"``) and
    that differs from its default gives a warning at construction naming it and the methods that use it.

    Raises:
        ValueError: at construction, for a bad argument (NaN and infinities included); at fit start, for a module with
            fewer than two modalities, a ``parameters`` choice that selects nothing in an encoder, a ``scores`` choice
            meaningless for its fusion, or ``"mmpareto"`` without ``aux_loss_weight``.
        TypeError: at fit start, for a module that is not modality-aware (saying what to implement).
        RuntimeError: at the first training step that recorded no per-modality predictions (or, for ``"mmpareto"``,
            no unimodal losses).
        FloatingPointError: at a step with non-finite scores or gradients, unless the run's policy skips it
            (``GradientMonitor(on_nonfinite="skip_step")``, see :func:`~ml_optim_plugins.nonfinite.nonfinite_policy`) or
            float16 AMP's scaler does; such a step is never rescaled.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from ml_optim_plugins import ModalityBalancer
        >>> balancer = ModalityBalancer("ogm_ge", alpha=0.5, window=(0, 50))
        >>> trainer = Trainer(max_epochs=3, callbacks=[balancer], logger=False)
        >>> balancer.parameters, ModalityBalancer("mmpareto").parameters
        ('weights', 'all')
    """

    def __init__(
        self,
        method: str = "ogm_ge",
        alpha: float = 0.5,
        smooth: bool = False,
        window: Sequence[int] | None = None,
        window_unit: str = "epoch",
        parameters: str | None = None,
        seed: int = 0,
        log_every_n_steps: int | None = None,
        clamp: Sequence[float] | None = (0.1, 10.0),
        gamma: float = 1.5,
        scores: str | None = None,
        max_gap: float | None = None,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method={method!r}; expected one of {', '.join(METHODS)}")
        alpha = check_number("alpha", alpha, at_least=0)
        if window is not None and (len(window) != 2 or window[0] > window[1]):
            raise ValueError(f"window must be (first, last) with first <= last, got {window}")
        if window_unit not in ("epoch", "step"):
            raise ValueError(f"window_unit={window_unit!r}; expected 'epoch' or 'step'")
        if parameters is None:
            parameters = METHODS[method].default_parameters
        if parameters not in PARAMETER_KINDS:
            raise ValueError(f"parameters={parameters!r}; expected one of {', '.join(PARAMETER_KINDS)}")
        self.method, self.alpha, self.smooth = method, alpha, smooth
        self.window = None if window is None else (int(window[0]), int(window[1]))
        self.window_unit, self.parameters, self.seed = window_unit, parameters, seed
        if log_every_n_steps is not None:
            check_integer("log_every_n_steps", log_every_n_steps, at_least=1)
        self.log_every_n_steps = log_every_n_steps
        self.clamp = None if clamp is None else _check_clamp(clamp)
        self.max_gap = check_optional_number("max_gap", max_gap, above=0)
        gamma = check_number("gamma", gamma, above=0)
        if scores is not None and scores not in MODALITY_SCORINGS:
            raise ValueError(f"scores={scores!r}; expected one of {', '.join(MODALITY_SCORINGS)} or None")
        self.gamma, self.scores = gamma, scores
        hyperparameters = {"alpha": alpha, "smooth": smooth, "seed": seed, "clamp": self.clamp,
                           "max_gap": self.max_gap, "gamma": gamma}
        accepted = inspect.signature(METHODS[method]).parameters
        ignored = _ignored_arguments(method, hyperparameters)  # the checked values: a clamp is a tuple of floats
        if ignored:
            rank_zero_warn(f"ModalityBalancer(method={method!r}) ignores {'; '.join(ignored)}: remove "
                           f"{'it' if len(ignored) == 1 else 'them'}, or choose a method that uses "
                           f"{'it' if len(ignored) == 1 else 'them'}")
        #: The :class:`BalancingMethod` that does the per-step work, built from the arguments its ``__init__`` names.
        self.balancing_method = METHODS[method](**{k: v for k, v in hyperparameters.items() if k in accepted})
        self.last: Stats = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        module = require_modality_aware(pl_module, "ModalityBalancer")
        if self.scores is not None:
            setter = getattr(module, "set_modality_scoring", None)
            if not callable(setter):
                raise TypeError(
                    f"ModalityBalancer(scores={self.scores!r}) needs a module with set_modality_scoring() "
                    f"(ModalityAwareMixin); {type(module).__name__} decides its per-modality logits itself"
                )
            if getattr(module, "modality_scoring", None) != self.scores:
                rank_zero_info(f"ModalityBalancer: per-modality logits by {self.scores!r} (the module had "
                               f"{getattr(module, 'modality_scoring', None)!r})")
            setter(self.scores)
        self.balancing_method.check_module(module)
        encoders = module.modality_encoders()
        if len(encoders) < 2:
            raise ValueError(f"ModalityBalancer needs at least two modalities, the module has {sorted(encoders)}")
        params = {
            name: [p for p in encoder.parameters() if _selected(p, self.parameters)] for name, encoder in encoders.items()
        }
        empty = [name for name, selected in params.items() if not selected]
        if empty:
            raise ValueError(
                f"ModalityBalancer(parameters={self.parameters!r}) selects no parameter of the encoders {empty}; "
                "use parameters='weights' or 'all'"
            )
        self.balancing_method.setup(list(encoders), params)

    def _in_window(self, trainer: pl.Trainer) -> bool:
        if self.window is None:
            return True
        now = trainer.current_epoch if self.window_unit == "epoch" else trainer.global_step
        return self.window[0] <= now <= self.window[1]

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self._in_window(trainer):
            self.balancing_method.on_before_backward(trainer, pl_module, loss)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.balancing_method.on_train_batch_end(trainer, pl_module)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        optimizer = getattr(optimizer, "optimizer", optimizer)
        # Only this optimizer's parameters: with several optimizers (manual optimization) each one's step changes
        # its own encoders' gradients, once.
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        stats = self.balancing_method.on_before_optimizer_step(
            trainer, pl_module, optimizer, owned, self._in_window(trainer)
        )
        if stats is not None:
            self._log(trainer, stats)

    def _log(self, trainer: pl.Trainer, stats: Stats) -> None:
        self.last = stats
        interval = self.log_every_n_steps or trainer.log_every_n_steps
        if trainer.global_step % interval == 0:
            log_to_loggers(trainer, {balance_key(m, k): v for m, values in stats.items() for k, v in values.items()})

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.method, **self.balancing_method.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("method")  # absent from checkpoints written before the methods were split out
        if saved is not None and saved != self.method:
            rank_zero_warn(f"ModalityBalancer: the checkpoint holds the state of method={saved!r}, not of "
                           f"method={self.method!r}; {self.method!r} starts from a fresh state")
            return
        self.balancing_method.load_state_dict(state_dict)
