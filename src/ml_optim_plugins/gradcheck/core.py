"""check_gradients: autograd gradients of a whole model's loss against central finite differences."""

from __future__ import annotations

import heapq
import time
from collections.abc import Sequence
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from torch import Tensor, nn

from ml_optim_plugins.batch_slicing import slice_batch
from ml_optim_plugins.gradcheck.report import FAILED, NONDIFFERENTIABLE, PASSED, GradCheckReport, TensorCheck
from ml_optim_plugins.hyperparameters import check_number
from ml_optim_plugins.module_copy import detached_copy, module_device
from ml_optim_plugins.multimodal.contract import parameter_modalities
from ml_optim_plugins.names import name_matches
from ml_optim_plugins.step_loss import LossFn, fixed_randomness, training_step_loss

_ROUNDING = 10 * torch.finfo(torch.float64).eps  # relative rounding error of one float64 loss evaluation, with margin


def _float_inputs(batch: Any) -> Any:
    """A copy of ``batch`` whose floating tensors are new float64 tensors (never shared with the caller's batch)."""
    if isinstance(batch, Tensor):
        return batch.detach().to(torch.float64, copy=True) if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return type(batch)((k, _float_inputs(v)) for k, v in batch.items())
    if isinstance(batch, (list, tuple)):
        return type(batch)(_float_inputs(v) for v in batch)
    return batch


class _Checker:
    """Holds the float64 copy, the batch and the tolerances; compares one tensor at a time."""

    def __init__(self, clone: nn.Module, batch: Any, loss_fn: LossFn, seed: int, eps: float, rtol: float, atol: float):
        self.clone, self.batch, self.loss_fn, self.seed = clone, batch, loss_fn, seed
        self.eps, self.rtol, self.atol = eps, rtol, atol
        self.device = module_device(clone)
        self.evaluations = 0

    def evaluate(self) -> float:
        self.evaluations += 1
        with fixed_randomness(self.seed, self.device), torch.no_grad():
            return float(self.loss_fn(self.clone, self.batch))

    def differences(self, tensor: Tensor, direction: Tensor, eps: float, f0: float) -> tuple[float, float, float, float]:
        """Central, forward and backward differences of the loss along ``direction``, and the rounding bound."""
        original = tensor.detach().clone()
        with torch.no_grad():
            tensor.add_(direction, alpha=eps)
            f_plus = self.evaluate()
            tensor.copy_(original).sub_(direction, alpha=eps)
            f_minus = self.evaluate()
            tensor.copy_(original)
        rounding = _ROUNDING * max(abs(f_plus), abs(f_minus), abs(f0)) / eps
        return (f_plus - f_minus) / (2 * eps), (f_plus - f0) / eps, (f0 - f_minus) / eps, rounding

    def tolerance(self, numerical: float, analytical: float, rounding: float) -> float:
        return self.atol + self.rtol * max(abs(numerical), abs(analytical)) + rounding

    def compare(self, tensor: Tensor, grad: Tensor, direction: Tensor, f0: float) -> tuple[str, float, float, float]:
        """``(status, numerical, analytical, abs_error)`` along one direction; retries a mismatch with a 10x smaller
        step to tell a kink crossed by the perturbation from a wrong gradient."""
        analytical = float((grad * direction).sum())
        central, forward, backward, rounding = self.differences(tensor, direction, self.eps, f0)
        error = abs(central - analytical)
        if error <= self.tolerance(central, analytical, rounding):
            return PASSED, central, analytical, error
        gap = abs(forward - backward)
        small_central, small_forward, small_backward, small_rounding = self.differences(
            tensor, direction, self.eps / 10, f0
        )
        small_error = abs(small_central - analytical)
        if small_error <= self.tolerance(small_central, analytical, small_rounding):
            return PASSED, small_central, analytical, small_error  # the kink was within eps, not within eps / 10
        small_gap = abs(small_forward - small_backward)
        one_sided_match = min(abs(small_forward - analytical), abs(small_backward - analytical)) <= self.tolerance(
            small_central, analytical, 2 * small_rounding
        )
        # Smooth functions: the one-sided differences agree to O(eps), so their gap shrinks ~10x with the step. At a
        # kink the gap is the jump of the derivative and does not shrink.
        kink = small_gap > self.tolerance(small_central, analytical, small_rounding) and small_gap > 0.5 * gap
        status = NONDIFFERENTIABLE if (one_sided_match or kink) else FAILED
        return status, central, analytical, error


def check_gradients(
    module: nn.Module,
    batch: Any,
    loss_fn: LossFn | None = None,
    *,
    params: Sequence[str] | None = None,
    inputs: bool = False,
    eps: float = 1e-6,
    rtol: float = 1e-4,
    atol: float = 1e-8,
    directions: int = 1,
    max_exact_elements: int = 16,
    max_samples: int | None = None,
    mode: str = "train",
    seed: int = 0,
    worst: int = 3,
) -> GradCheckReport:
    """Check a model's analytical gradients against central finite differences, on a float64 copy.

    On a float64 deep copy (the module, its optimizer and the caller's RNG are untouched), with stochastic layers
    fixed by a seed, every trainable parameter tensor is compared: small tensors element by element, larger ones along
    random unit directions, at two loss evaluations each. A mismatch is retried with a 10x smaller step; a kink (ReLU,
    max tie) is reported ``"nondifferentiable"``, not failed. docs/gradcheck.md explains each choice.

    Args:
        module: any ``nn.Module``; by default its ``training_step(batch, 0)`` gives the loss (a LightningModule such as
            :class:`~ml_optim_plugins.MultimodalClassifier`).
        batch: one batch as the module's ``training_step`` takes it.
        loss_fn: ``loss_fn(module, batch) -> scalar tensor``, instead of ``training_step``.
        params: names or globs of the parameters (or modules) to check; default all trainable ones.
        inputs: also check the gradient with respect to the batch's floating tensors (reported as ``input.<path>``).
        eps: finite-difference step (float64: 1e-6 balances truncation and rounding).
        rtol: relative tolerance: ``|numerical - analytical| <= atol + rtol * max(|numerical|, |analytical|)``, plus
            the float64 rounding error of the difference quotient.
        atol: absolute tolerance.
        directions: random directions per large tensor (one catches a scaled, sign-flipped or incomplete gradient).
        max_exact_elements: tensors up to this size are checked element by element.
        max_samples: check on the first ``max_samples`` samples of the batch only (faster; same code paths).
        mode: ``"train"`` (dropout fixed by the seed, BatchNorm on batch statistics) or ``"eval"`` (no dropout,
            running statistics).
        seed: seed of the masks and of the random directions.
        worst: how many worst comparisons to keep per tensor.

    Returns:
        A :class:`GradCheckReport`.

    Raises:
        ValueError: for bad arguments, a non-finite loss, or a ``params`` filter that selects nothing.
        TypeError: when the loss cannot be obtained (no ``training_step`` and no ``loss_fn``).

    Example:
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> report = check_gradients(BoringModel(), torch.randn(4, 32))
        >>> report.passed, [t.mode for t in report.tensors]
        (True, ['directions', 'elements'])
    """
    if mode not in ("train", "eval"):
        raise ValueError(f"mode={mode!r}; expected 'train' or 'eval'")
    check_number("eps", eps, above=0)
    check_number("rtol", rtol, at_least=0)
    check_number("atol", atol, at_least=0)
    if directions < 1 or max_exact_elements < 0:
        raise ValueError(
            f"need directions >= 1 and max_exact_elements >= 0; got directions={directions}, "
            f"max_exact_elements={max_exact_elements}"
        )
    start = time.perf_counter()
    loss_fn = loss_fn or training_step_loss
    clone = detached_copy(module, torch.float64)
    clone.train(mode == "train")
    device = module_device(clone)
    batch64 = _to_device(_float_inputs(slice_batch(batch, max_samples)), device)
    leaves = _leaves_on(batch64) if inputs else []
    modality = parameter_modalities(clone)
    targets = [(n, p, n.rpartition(".")[0], modality.get(id(p))) for n, p in clone.named_parameters()
               if p.requires_grad and (params is None or name_matches(n, params))]
    targets += [(name, t.requires_grad_(), "input", None) for name, t in leaves]
    if not targets:
        raise ValueError(f"params={list(params) if params else params} selects no trainable parameter")
    checker = _Checker(clone, batch64, loss_fn, seed, eps, rtol, atol)
    with fixed_randomness(seed, device), torch.enable_grad():
        loss = loss_fn(clone, batch64)
    if not torch.isfinite(loss):
        raise ValueError(f"the loss is {loss.item()} on this batch; a gradient check needs a finite loss")
    grads = torch.autograd.grad(loss, [t for _, t, _, _ in targets], allow_unused=True)
    f0 = checker.evaluate()
    results = []
    for index, ((name, tensor, owner, modality_name), grad) in enumerate(zip(targets, grads)):
        grad = torch.zeros_like(tensor) if grad is None else grad.detach()
        results.append(_check_tensor(checker, name, tensor, grad, owner, modality_name, f0,
                                     directions, max_exact_elements, seed + index, worst))
    return GradCheckReport(
        results, eps, rtol, atol, float(loss.detach()), time.perf_counter() - start, checker.evaluations
    )


def _to_device(batch: Any, device: torch.device) -> Any:
    return apply_to_collection(batch, Tensor, lambda t: t.to(device))


def _leaves_on(batch: Any, path: str = "input") -> list[tuple[str, Tensor]]:
    """Floating tensors of ``batch`` with their paths (``input.image``, ``input.0``)."""
    if isinstance(batch, Tensor):
        return [(path, batch)] if batch.is_floating_point() else []
    if isinstance(batch, dict):
        return [leaf for k, v in batch.items() for leaf in _leaves_on(v, f"{path}.{k}")]
    if isinstance(batch, (list, tuple)):
        return [leaf for i, v in enumerate(batch) for leaf in _leaves_on(v, f"{path}.{i}")]
    return []


def _check_tensor(
    checker: _Checker, name: str, tensor: Tensor, grad: Tensor, owner: str, modality: str | None, f0: float,
    directions: int, max_exact_elements: int, seed: int, worst: int,
) -> TensorCheck:
    exact = tensor.numel() <= max_exact_elements
    if exact:
        vectors = (("index", i, _unit(tensor, i)) for i in range(tensor.numel()))
    else:
        generator = torch.Generator().manual_seed(seed)
        vectors = (("direction", k, _random_unit(tensor, generator)) for k in range(directions))
    statuses, worst_items, max_abs, max_rel, count = set(), [], 0.0, 0.0, 0
    for label, position, vector in vectors:
        status, numerical, analytical, error = checker.compare(tensor, grad, vector, f0)
        # Relative to the larger of the two, floored at atol / rtol so that two near-zero values do not read as 100%.
        floor = checker.atol / checker.rtol if checker.rtol > 0 else 0.0
        scale = max(abs(numerical), abs(analytical), floor)
        relative = error / scale if scale > 0 else 0.0
        statuses.add(status)
        max_abs, max_rel, count = max(max_abs, error), max(max_rel, relative), count + 1
        item = {label: position, "numerical": numerical, "analytical": analytical, "abs_error": error}
        heapq.heappush(worst_items, (error, count, item))
        if len(worst_items) > worst:
            heapq.heappop(worst_items)
    status = FAILED if FAILED in statuses else NONDIFFERENTIABLE if NONDIFFERENTIABLE in statuses else PASSED
    ranked = [item for _, _, item in sorted(worst_items, key=lambda entry: -entry[0])]
    return TensorCheck(name, owner, modality, "elements" if exact else "directions", count, max_abs, max_rel,
                       status, ranked)


def _unit(tensor: Tensor, index: int) -> Tensor:
    vector = torch.zeros_like(tensor)
    vector.view(-1)[index] = 1.0
    return vector


def _random_unit(tensor: Tensor, generator: torch.Generator) -> Tensor:
    vector = torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
    return (vector / vector.norm().clamp_min(1e-30)).to(tensor.device)


