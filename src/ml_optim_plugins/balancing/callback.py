"""ModalityBalancer: slow down the dominant modality's encoder so the weaker one trains too."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn
from torch.optim import Optimizer

from ml_optim_plugins.balancing.agm import agm_coefficients, agm_ratios, mono_modal_losses, update_running
from ml_optim_plugins.balancing.mmpareto import mmpareto_combine, mmpareto_weights_from_dots
from ml_optim_plugins.balancing.ogm_ge import modulate_with_noise, ogm_ge_coefficients, true_class_scores
from ml_optim_plugins.hyperparameters import check_integer, check_number, check_optional_number
from ml_optim_plugins.lightning_internals import optimizer_unscales_in_step
from ml_optim_plugins.logger_metrics import log_to_loggers
from ml_optim_plugins.multimodal.contract import (
    MODALITY_SCORINGS,
    recorded_modality_outputs,
    require_modality_aware,
)
from ml_optim_plugins.nonfinite import nonfinite_policy, scaler_skips_nonfinite
from ml_optim_plugins.rank_mean import mean_over_ranks

METHODS = ("ogm_ge", "ogm", "agm", "mmpareto")
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


class ModalityBalancer(Callback):
    """Per-modality gradient modulation (OGM / OGM-GE, Peng et al. CVPR 2022; AGM, Li et al. ICCV 2023) for any
    modality-aware module.

    Once per optimizer step, in ``on_before_optimizer_step`` (after backward and gradient accumulation, after DDP
    averaged the gradients and AMP unscaled them, before gradient clipping), it:

    1. scores each modality on the step's samples, ``s_u = sum softmax(logits_u)[y]``, from the module's per-modality
       predictions (the modality contract: exact head split for the linear late fusions, masking for the others),
       summed over the micro-batches of the step and all-reduced over DDP ranks, so every rank sees the global batch's
       scores and computes the same coefficients;
    2. turns them into coefficients with :func:`~ml_optim_plugins.ogm_ge_coefficients` (ratio against the weakest
       modality; the weakest keeps 1), or, for ``"agm"``, scores each modality by its mean cross-entropy and uses
       :func:`~ml_optim_plugins.agm_coefficients` against the running means of those losses (a modality ahead of its
       usual standing is slowed, one behind is sped up, ``k > 1``);
    3. multiplies the gradients of each modality's encoder parameters (the contract's ``modality_encoders()``, never
       name substrings) by its coefficient and, for ``"ogm_ge"``, adds Gaussian noise with the std of the
       unmodulated gradient, drawn from a generator seeded with ``(seed, step)`` so every rank adds the same noise.

    ``"mmpareto"`` (MMPareto, Wei & Hu ICML 2024) works differently: it needs the module's unimodal losses
    (``MultimodalClassifier(aux_loss_weight > 0)``, which records them in ``modality_losses``). Before each backward
    pass it computes each encoder's gradient of its own unimodal loss (one extra backward through each encoder); at
    the optimizer step it takes the multimodal part as the rest of the encoder's gradient, all-reduces the unimodal
    part under DDP, and combines the two per encoder (:func:`~ml_optim_plugins.mmpareto_weights`: equal weights when
    they agree, the minimum-norm weights when they conflict) and per tensor
    (:func:`~ml_optim_plugins.mmpareto_combine`: never smaller than the plain gradient, times ``gamma``).

    With several optimizers (manual optimization), each optimizer's step modulates only its own parameters, and the
    batch is scored once, at its first optimizer step.

    Only inside the modulation ``window``. A step with non-finite scores or gradients is never rescaled (nor counted in
    AGM's running means): it raises ``FloatingPointError``, unless the run's policy skips it
    (``GradientMonitor(on_nonfinite="skip_step")``, see :func:`~ml_optim_plugins.nonfinite_policy`) or float16 AMP's
    scaler does. Logs per modality, every ``log_every_n_steps``: ``balance/{m}/score``, ``ratio``,
    ``coefficient`` and the norms of the encoder's selected gradients: ``grad_norm_before`` (``g``),
    ``grad_norm_modulated`` (``k g``, i.e. ``k`` times the norm before), ``noise_norm`` (the enhancement noise ``n``,
    0 without it) and ``grad_norm_after`` (``k g + n``, what the optimizer steps with: above the norm before when the
    noise outweighs the modulation); for MMPareto ``cosine``, ``k_multimodal``, ``k_unimodal``, ``grad_norm_before``
    and ``grad_norm_after``.

    Args:
        method: ``"ogm_ge"`` (modulation + Gaussian enhancement), ``"ogm"`` (modulation only), ``"agm"`` or
            ``"mmpareto"``.
        alpha: modulation strength (required by the reference code, tuned per dataset in the paper: sweep it).
        smooth: the continuous coefficient ``1 - tanh(alpha * (rho - 1))`` instead of the reference's discontinuous one.
        window: ``(first, last)`` epoch or step (inclusive) during which to modulate; ``None``: always. The reference
            code modulates epochs 0 to 50.
        window_unit: ``"epoch"`` or ``"step"``.
        parameters: which encoder parameters to modulate: ``"weights"`` (tensors of 2 or more dimensions; the default
            of the OGM and AGM methods), ``"all"`` (MMPareto's default, as its reference code), or ``"conv"`` (4-D
            kernels only, as the OGM-GE reference code, which leaves a transformer untouched).
        seed: seed of the enhancement noise.
        log_every_n_steps: logging interval; ``None``: the Trainer's.
        clamp: ``(low, high)`` bounds of AGM's coefficients, which grow exponentially (the library's own guard);
            ``None``: unbounded.
        max_gap: AGM's cap on ``t_u - r_u`` before ``alpha``, as in the reference code (10 in its CREMA-D script, 7
            in its UR-Funny one, none in the others); ``None``: no cap. See :func:`~ml_optim_plugins.agm_coefficients`.
        gamma: MMPareto's final gradient scale (1.5 in the reference code).
        scores: how per-modality predictions are obtained (``"head_split"``, ``"masking"``, ``"aux_heads"``; see
            :meth:`~ml_optim_plugins.ModalityAwareMixin.set_modality_scoring`); ``None`` leaves the module's choice.
            A choice that is meaningless for the module's fusion is an error at fit start.

    Raises:
        TypeError: at fit start, if the module is not modality-aware (with what to implement).
        ValueError: bad arguments (NaN and infinities included).
        FloatingPointError: at a step with non-finite scores or gradients, under the run's default policy ``"raise"``.

    Example::

        trainer = Trainer(callbacks=[ModalityBalancer("ogm_ge", alpha=0.5, window=(0, 50))])
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
            parameters = "all" if method == "mmpareto" else "weights"
        if parameters not in PARAMETER_KINDS:
            raise ValueError(f"parameters={parameters!r}; expected one of {', '.join(PARAMETER_KINDS)}")
        self.method, self.alpha, self.smooth = method, alpha, smooth
        self.window = None if window is None else (int(window[0]), int(window[1]))
        self.window_unit, self.parameters, self.seed = window_unit, parameters, seed
        if log_every_n_steps is not None:
            check_integer("log_every_n_steps", log_every_n_steps, at_least=1)
        self.log_every_n_steps = log_every_n_steps
        self.clamp = None if clamp is None else _check_clamp(clamp)
        # The reference caps t - r at 10 or 7.
        self.max_gap = check_optional_number("max_gap", max_gap, above=0)
        gamma = check_number("gamma", gamma, above=0)
        if scores is not None and scores not in MODALITY_SCORINGS:
            raise ValueError(f"scores={scores!r}; expected one of {', '.join(MODALITY_SCORINGS)} or None")
        self.gamma, self.scores = gamma, scores
        self._unimodal: dict[str, dict[int, Tensor]] = {}
        self._running: dict[str, float] = {}
        self._agm_steps = 0
        self._modalities: list[str] = []
        self._params: dict[str, list[nn.Parameter]] = {}
        self._pending: Tensor | None = None
        self._stepped = False  # an optimizer step happened in the current batch
        self._step_values: tuple[dict[str, float], dict[str, float], dict[str, float]] | None = None
        self.last: dict[str, dict[str, float]] = {}

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
        if self.method == "mmpareto" and not getattr(module, "aux_loss_weight", 0):
            raise ValueError(
                "ModalityBalancer('mmpareto') combines each encoder's multimodal and unimodal gradients, so the module "
                "needs unimodal losses and their weight in the objective: MultimodalClassifier(aux_loss_weight=1.0) "
                "(the reference weighs them 1), or, in your own module, an aux_loss_weight attribute and "
                "self.modality_losses = {modality: loss} set in training_step"
            )
        encoders = module.modality_encoders()
        if len(encoders) < 2:
            raise ValueError(f"ModalityBalancer needs at least two modalities, the module has {sorted(encoders)}")
        self._modalities = list(encoders)
        self._params = {
            name: [p for p in encoder.parameters() if _selected(p, self.parameters)] for name, encoder in encoders.items()
        }
        empty = [name for name, params in self._params.items() if not params]
        if empty:
            raise ValueError(
                f"ModalityBalancer(parameters={self.parameters!r}) selects no parameter of the encoders {empty}; "
                "use parameters='weights' or 'all'"
            )

    def _in_window(self, trainer: pl.Trainer) -> bool:
        if self.window is None:
            return True
        now = trainer.current_epoch if self.window_unit == "epoch" else trainer.global_step
        return self.window[0] <= now <= self.window[1]

    def _current_scores(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor:
        """Per-modality sums over the batch (true-class probabilities for OGM, cross-entropies for AGM), then the
        number of samples: sums, so that micro-batches and DDP ranks add up."""
        logits, targets = recorded_modality_outputs(
            pl_module, self._modalities, "ModalityBalancer", trainer.global_step
        )
        score_fn = mono_modal_losses if self.method == "agm" else true_class_scores
        scores = score_fn(logits, targets)
        count = torch.tensor(float(targets.shape[0]), device=targets.device)
        return torch.stack([*(scores[name] for name in self._modalities), count])

    def _coefficients(self, sums: Tensor) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
        """``(scores, ratios, coefficients)`` per modality from the step's global sums."""
        values = sums.tolist()
        count = values[-1]
        if self.method == "agm":
            scores = {name: values[i] / max(count, 1.0) for i, name in enumerate(self._modalities)}
            running = self._running or dict.fromkeys(self._modalities, 0.0)
            coefficients = agm_coefficients(scores, running, self.alpha, self.clamp, self.max_gap)
            ratios = agm_ratios(scores)
            self._agm_steps += 1
            self._running = update_running(running, scores, self._agm_steps)
            return scores, ratios, coefficients
        scores = {name: values[i] for i, name in enumerate(self._modalities)}
        weakest = min(scores.values())
        ratios = {name: score / weakest if weakest > 0 else 1.0 for name, score in scores.items()}
        return scores, ratios, ogm_ge_coefficients(scores, self.alpha, self.smooth)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self.method != "mmpareto" or not self._in_window(trainer):
            return
        losses = getattr(pl_module, "modality_losses", None) or {}
        missing = [name for name in self._modalities if name not in losses]
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
        for name in self._modalities:
            params = [p for p in self._params[name] if p.requires_grad]
            if not params:
                continue
            grads = torch.autograd.grad(losses[name] * scale, params, retain_graph=True, allow_unused=True)
            buffer = self._unimodal.setdefault(name, {})
            for p, g in zip(params, grads):
                if g is not None:
                    g = g / (scale * accumulate)
                    buffer[id(p)] = g if id(p) not in buffer else buffer[id(p)] + g

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.method == "mmpareto":
            if self._stepped:  # unimodal gradients of parameters no optimizer stepped in this batch are stale
                self._unimodal, self._stepped = {}, False
            return
        if self._stepped:  # this batch's scores went into the step
            self._stepped, self._step_values = False, None
            return
        scores = self._current_scores(trainer, pl_module)  # a micro-batch of an accumulated step
        self._pending = scores if self._pending is None else self._pending + scores

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        optimizer = getattr(optimizer, "optimizer", optimizer)
        # Only this optimizer's parameters: with several optimizers (manual optimization) each one's step modulates
        # its own encoders' gradients, once.
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if self.method == "mmpareto":
            self._pareto_step(trainer, pl_module, optimizer, owned)
            return
        if not self._stepped:  # the batch's first optimizer step: score it (with any accumulated micro-batches)
            self._stepped = True
            scores = self._current_scores(trainer, pl_module)
            if self._pending is not None:
                scores, self._pending = scores + self._pending.to(scores.device), None
            sums = trainer.strategy.reduce(scores, reduce_op="sum")  # the global batch's sums on every rank
            if bool(torch.isfinite(sums).all()):
                self._step_values = self._coefficients(sums)  # AGM's running means advance once per batch
            else:  # never into AGM's running means
                self._step_values = None
                self._nonfinite(trainer, "per-modality scores")
        if self._step_values is None or not self._in_window(trainer):
            return
        scores_by_name, ratios, coefficients = self._step_values
        params = {name: [p for p in self._params[name] if p.grad is not None and id(p) in owned]
                  for name in self._modalities}
        grads = [p.grad for group in params.values() for p in group]
        if not grads:
            return
        if not bool(torch.isfinite(torch.stack([g.float().sum() for g in grads])).all()):
            bad = [name for name, group in params.items() if any(not torch.isfinite(p.grad).all() for p in group)]
            self._nonfinite(trainer, f"gradients in the {bad} encoder(s)")
            return
        generator_device = grads[0].device
        generator = torch.Generator(device=generator_device).manual_seed(self.seed * 1_000_003 + trainer.global_step)
        # Squared norms (before, after, noise) per modality, kept on the device: one host sync for the whole step.
        squares = torch.zeros(len(self._modalities), 3, device=generator_device)
        for row, name in enumerate(self._modalities):
            for p in params[name]:
                original = p.grad
                new, noise = modulate_with_noise(original, coefficients[name], self.method == "ogm_ge", generator)
                # Norms in one pass each, without temporaries of the gradient's size.
                squares[row, 0] += torch.linalg.vector_norm(original, dtype=torch.float32).square()
                squares[row, 1] += torch.linalg.vector_norm(new, dtype=torch.float32).square()
                if noise is not None:
                    squares[row, 2] += torch.linalg.vector_norm(noise, dtype=torch.float32).square()
                p.grad = new
        norms = squares.sqrt().tolist()
        stats: dict[str, dict[str, float]] = {
            name: {
                "score": scores_by_name[name],
                "ratio": ratios[name],
                "coefficient": coefficients[name],
                "grad_norm_before": norms[row][0],
                "grad_norm_modulated": coefficients[name] * norms[row][0],  # ||k g|| = k ||g||, k > 0
                "noise_norm": norms[row][2],
                "grad_norm_after": norms[row][1],
            }
            for row, name in enumerate(self._modalities)
            if any(id(p) in owned for p in self._params[name])  # this optimizer's modalities (frozen ones included)
        }
        self._log(trainer, stats)

    def _pareto_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer, owned: set[int]
    ) -> None:
        self._stepped = True
        if not self._unimodal or not self._in_window(trainer):
            self._unimodal = {}
            return
        weight = float(pl_module.aux_loss_weight)
        # This optimizer's parameters take (and consume) their unimodal gradients; another optimizer's stay for its step.
        entries = [(row, p, self._unimodal.get(name, {}).pop(id(p), None)) for row, name in enumerate(self._modalities)
                   for p in self._params[name] if p.grad is not None and id(p) in owned]
        if not entries:
            return
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
            self._nonfinite(trainer, "multimodal or unimodal gradients")
            return
        device = entries[0][1].grad.device
        dots = torch.zeros(len(self._modalities), 5, device=device,
                           dtype=torch.float32 if device.type == "mps" else torch.float64)
        multimodal = []
        for (row, p, _), g_u in zip(entries, unimodal):
            g_mm = p.grad - g_u
            multimodal.append(g_mm)
            a, b = g_mm.to(dots.dtype).reshape(-1), g_u.to(dots.dtype).reshape(-1)
            dots[row, :3] += torch.stack([a @ a, b @ b, a @ b])
        weights = {name: mmpareto_weights_from_dots(*values[:3]) for name, values in zip(self._modalities, dots.tolist())}
        for (row, p, _), g_mm, g_u in zip(entries, multimodal, unimodal):
            k_mm, k_u, _ = weights[self._modalities[row]]
            new = mmpareto_combine(p.grad, g_mm, g_u, k_mm, k_u, self.gamma)
            dots[row, 3] += p.grad.to(dots.dtype).pow(2).sum()
            dots[row, 4] += new.to(dots.dtype).pow(2).sum()
            p.grad = new
        norms = dots[:, 3:].sqrt().tolist()
        rows = {row for row, _, _ in entries}  # modalities with trainable, used parameters (not a frozen encoder)
        self._log(trainer, {
            name: {"cosine": weights[name][2], "k_multimodal": weights[name][0], "k_unimodal": weights[name][1],
                   "grad_norm_before": norms[row][0], "grad_norm_after": norms[row][1]}
            for row, name in enumerate(self._modalities) if row in rows
        })

    def _nonfinite(self, trainer: pl.Trainer, what: str) -> None:
        """A step with non-finite values is never rescaled; the run's policy (:func:`~ml_optim_plugins.nonfinite_policy`)
        says whether it stops here or a GradientMonitor skips the step (or warns); float16 AMP's scaler skips it."""
        if scaler_skips_nonfinite(trainer) or nonfinite_policy(trainer) != "raise":
            return
        raise FloatingPointError(
            f"ModalityBalancer: non-finite {what} at step {trainer.global_step}; the step is not balanced. Lower the "
            "learning rate, check the inputs and the loss for NaN/Inf, or attach GradientMonitor(on_nonfinite="
            "'skip_step') to skip such steps"
        )

    def _log(self, trainer: pl.Trainer, stats: dict[str, dict[str, float]]) -> None:
        self.last = stats
        interval = self.log_every_n_steps or trainer.log_every_n_steps
        if trainer.global_step % interval == 0:
            log_to_loggers(trainer, {f"balance/{m}/{k}": v for m, values in stats.items() for k, v in values.items()})

    def state_dict(self) -> dict[str, Any]:
        pending = None if self._pending is None else self._pending.tolist()
        return {"pending": pending, "stepped": self._stepped, "running": self._running, "agm_steps": self._agm_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = None if state_dict["pending"] is None else torch.tensor(state_dict["pending"])
        self._stepped = state_dict["stepped"]
        self._running = dict(state_dict["running"])
        self._agm_steps = state_dict["agm_steps"]
