"""OGM, OGM-GE and AGM as balancing methods: per-modality scores -> coefficients -> scaled encoder gradients."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.optim import Optimizer

from ml_optim_plugins.balancing.agm import agm_coefficients, agm_ratios, mono_modal_losses, update_running
from ml_optim_plugins.balancing.method import BalancingMethod, Stats, refuse_nonfinite_step
from ml_optim_plugins.balancing.ogm_ge import modulate_with_noise, ogm_ge_coefficients, true_class_scores
from ml_optim_plugins.multimodal.contract import recorded_modality_outputs

#: ``(scores, ratios, coefficients)`` per modality, as logged.
StepValues = tuple[dict[str, float], dict[str, float], dict[str, float]]


class ScoreModulation(BalancingMethod):
    """A method that scores each modality on the step's samples and multiplies its encoder's gradients by a coefficient.

    The scores are sums over the samples (:meth:`modality_scores`), added up over the micro-batches of an accumulated
    step and all-reduced over DDP ranks, so every rank computes the same coefficients (:meth:`coefficients`) from the
    global batch. The batch is scored at its first optimizer step, also outside the modulation window; the gradients
    are scaled only inside it. A subclass gives the two methods named here, and :meth:`noise_generator` to add noise.

    Args:
        alpha: modulation strength.
    """

    def __init__(self, alpha: float) -> None:
        super().__init__()
        self.alpha = alpha
        self._pending: Tensor | None = None  # score sums of the step's earlier micro-batches
        self._stepped = False  # an optimizer step happened in the current batch
        self._step_values: StepValues | None = None

    @abstractmethod
    def modality_scores(self, logits: Mapping[str, Tensor], targets: Tensor) -> dict[str, Tensor]:
        """Each modality's score summed over the batch's samples (sums, so micro-batches and ranks add up)."""

    @abstractmethod
    def coefficients(self, sums: Mapping[str, float], count: float) -> StepValues:
        """``(scores, ratios, coefficients)`` per modality from the global batch's score sums and sample count."""

    def noise_generator(self, trainer: pl.Trainer, device: torch.device) -> torch.Generator | None:
        """The generator of the noise added to the modulated gradients; ``None`` (the default): no noise."""
        return None

    def _batch_scores(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor:
        """The batch's score sums in modality order, then its number of samples."""
        logits, targets = recorded_modality_outputs(pl_module, self.modalities, "ModalityBalancer", trainer.global_step)
        scores = self.modality_scores(logits, targets)
        count = torch.tensor(float(targets.shape[0]), device=targets.device)
        return torch.stack([*(scores[name] for name in self.modalities), count])

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._stepped:  # this batch's scores went into the step
            self._stepped, self._step_values = False, None
            return
        scores = self._batch_scores(trainer, pl_module)  # a micro-batch of an accumulated step
        self._pending = scores if self._pending is None else self._pending + scores

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer, owned: set[int], in_window: bool
    ) -> Stats | None:
        if not self._stepped:  # the batch's first optimizer step: score it (with any accumulated micro-batches)
            self._stepped = True
            scores = self._batch_scores(trainer, pl_module)
            if self._pending is not None:
                scores, self._pending = scores + self._pending.to(scores.device), None
            sums = trainer.strategy.reduce(scores, reduce_op="sum")  # the global batch's sums on every rank
            if bool(torch.isfinite(sums).all()):
                values = sums.tolist()  # a running state (AGM's) advances here, once per batch
                self._step_values = self.coefficients(dict(zip(self.modalities, values)), values[-1])
            else:  # never into a running state
                self._step_values = None
                refuse_nonfinite_step(trainer, "per-modality scores")
        if self._step_values is None or not in_window:
            return None
        return self._modulate(trainer, owned, *self._step_values)

    def _modulate(
        self, trainer: pl.Trainer, owned: set[int], scores: dict[str, float], ratios: dict[str, float],
        coefficients: dict[str, float],
    ) -> Stats | None:
        params = {name: [p for p in self.params[name] if p.grad is not None and id(p) in owned]
                  for name in self.modalities}
        grads = [p.grad for group in params.values() for p in group]
        if not grads:
            return None
        if not bool(torch.isfinite(torch.stack([g.float().sum() for g in grads])).all()):
            bad = [name for name, group in params.items() if any(not torch.isfinite(p.grad).all() for p in group)]
            refuse_nonfinite_step(trainer, f"gradients in the {bad} encoder(s)")
            return None
        device = grads[0].device
        generator = self.noise_generator(trainer, device)
        # Squared norms (before, after, noise) per modality, kept on the device: one host sync for the whole step.
        squares = torch.zeros(len(self.modalities), 3, device=device)
        for row, name in enumerate(self.modalities):
            for p in params[name]:
                original = p.grad
                new, noise = modulate_with_noise(original, coefficients[name], generator is not None, generator)
                # Norms in one pass each, without temporaries of the gradient's size.
                squares[row, 0] += torch.linalg.vector_norm(original, dtype=torch.float32).square()
                squares[row, 1] += torch.linalg.vector_norm(new, dtype=torch.float32).square()
                if noise is not None:
                    squares[row, 2] += torch.linalg.vector_norm(noise, dtype=torch.float32).square()
                p.grad = new
        norms = squares.sqrt().tolist()
        return {
            name: {
                "score": scores[name],
                "ratio": ratios[name],
                "coefficient": coefficients[name],
                "grad_norm_before": norms[row][0],
                "grad_norm_modulated": coefficients[name] * norms[row][0],  # ||k g|| = k ||g||, k > 0
                "noise_norm": norms[row][2],
                "grad_norm_after": norms[row][1],
            }
            for row, name in enumerate(self.modalities)
            if any(id(p) in owned for p in self.params[name])  # this optimizer's modalities (frozen ones included)
        }

    def state_dict(self) -> dict[str, Any]:
        return {"pending": None if self._pending is None else self._pending.tolist(), "stepped": self._stepped}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self._pending = None if state_dict["pending"] is None else torch.tensor(state_dict["pending"])
        self._stepped = state_dict["stepped"]


class OGM(ScoreModulation):
    """On-the-fly gradient modulation: :func:`~ml_optim_plugins.functional.ogm_ge_coefficients` of the summed true-class
    probabilities (:func:`~ml_optim_plugins.functional.true_class_scores`); the weakest modality keeps 1.

    Args:
        alpha: modulation strength.
        smooth: the continuous coefficient ``1 - tanh(alpha * (rho - 1))``.
    """

    name = "ogm"

    def __init__(self, alpha: float, smooth: bool = False) -> None:
        super().__init__(alpha)
        self.smooth = smooth

    def modality_scores(self, logits: Mapping[str, Tensor], targets: Tensor) -> dict[str, Tensor]:
        return true_class_scores(logits, targets)

    def coefficients(self, sums: Mapping[str, float], count: float) -> StepValues:
        scores = dict(sums)
        weakest = min(scores.values())
        ratios = {name: score / weakest if weakest > 0 else 1.0 for name, score in scores.items()}
        return scores, ratios, ogm_ge_coefficients(scores, self.alpha, self.smooth)


class OGMGE(OGM):
    """OGM plus generalisation enhancement: Gaussian noise with the std of the unmodulated gradient, drawn from a
    generator seeded with ``(seed, step)`` so every DDP rank adds the same noise.

    Args:
        alpha: modulation strength.
        smooth: the continuous coefficient ``1 - tanh(alpha * (rho - 1))``.
        seed: seed of the noise.
    """

    name = "ogm_ge"

    def __init__(self, alpha: float, smooth: bool = False, seed: int = 0) -> None:
        super().__init__(alpha, smooth)
        self.seed = seed

    def noise_generator(self, trainer: pl.Trainer, device: torch.device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + trainer.global_step)


class AGM(ScoreModulation):
    """Adaptive gradient modulation: :func:`~ml_optim_plugins.functional.agm_coefficients` of each modality's mean cross-entropy
    (:func:`~ml_optim_plugins.functional.mono_modal_losses`) against the running means of those losses, which advance once per
    batch and are saved in :meth:`state_dict`.

    Args:
        alpha: modulation strength.
        clamp: ``(low, high)`` bounds of the coefficients; ``None``: unbounded.
        max_gap: the cap on ``t_u - r_u`` before ``alpha``; ``None``: no cap.
    """

    name = "agm"

    def __init__(self, alpha: float, clamp: Sequence[float] | None = (0.1, 10.0), max_gap: float | None = None) -> None:
        super().__init__(alpha)
        self.clamp, self.max_gap = clamp, max_gap
        self._running: dict[str, float] = {}
        self._steps = 0

    def modality_scores(self, logits: Mapping[str, Tensor], targets: Tensor) -> dict[str, Tensor]:
        return mono_modal_losses(logits, targets)

    def coefficients(self, sums: Mapping[str, float], count: float) -> StepValues:
        scores = {name: value / max(count, 1.0) for name, value in sums.items()}
        running = self._running or dict.fromkeys(self.modalities, 0.0)
        coefficients = agm_coefficients(scores, running, self.alpha, self.clamp, self.max_gap)
        self._steps += 1
        self._running = update_running(running, scores, self._steps)
        return scores, agm_ratios(scores), coefficients

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "running": dict(self._running), "agm_steps": self._steps}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._running = dict(state_dict["running"])
        self._steps = state_dict["agm_steps"]
