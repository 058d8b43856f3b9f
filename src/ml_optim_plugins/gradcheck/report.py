"""GradCheckReport: the result of a gradient check, per tensor, per module and per modality."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

PASSED, FAILED, NONDIFFERENTIABLE = "passed", "failed", "nondifferentiable"


@dataclass
class TensorCheck:
    """The check of one tensor (a parameter, or an input if asked).

    Attributes:
        name: qualified parameter name (``encoders.text.model...query.weight``) or ``input:<path>``.
        module: the module that owns it (its name without the last component).
        modality: the modality whose encoder holds it, ``None`` for shared parameters (fusion, head) or inputs.
        mode: ``"elements"`` (every element perturbed) or ``"directions"`` (random directions).
        checks: how many elements or directions were compared.
        max_abs_error: the largest ``|numerical - analytical|``.
        max_rel_error: the largest ``|numerical - analytical| / max(|numerical|, |analytical|, atol / rtol)``.
        status: ``"passed"``, ``"failed"``, or ``"nondifferentiable"`` (the perturbation crossed a kink, e.g. of a ReLU
            or a max, and the one-sided differences disagree: not evidence of a wrong gradient).
        worst: the worst comparisons: ``{"index" or "direction", "numerical", "analytical"}``.

    Example:
        >>> TensorCheck("head.weight", "head", None, "directions", 1, 1e-11, 1e-9, "passed").passed
        True
    """

    name: str
    module: str
    modality: str | None
    mode: str
    checks: int
    max_abs_error: float
    max_rel_error: float
    status: str
    worst: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.status != FAILED


@dataclass
class GradCheckReport:
    """Numerical vs analytical gradients of a whole model: one :class:`TensorCheck` per tensor.

    ``passed`` is False if any tensor failed (a tensor whose only mismatches are at non-differentiable points is not a
    failure); ``str(report)`` is a readable table, worst first; ``to_dict()`` is JSON-ready.

    Example:
        >>> report = GradCheckReport([TensorCheck("head.weight", "head", None, "elements", 6, 2e-11, 1e-10, "passed")],
        ...                          eps=1e-6, rtol=1e-4, atol=1e-8, loss=0.7, seconds=0.1, evaluations=13)
        >>> report.passed, report.failed
        (True, [])
    """

    tensors: list[TensorCheck]
    eps: float
    rtol: float
    atol: float
    loss: float
    seconds: float
    evaluations: int

    @property
    def passed(self) -> bool:
        """True when no tensor failed."""
        return all(t.passed for t in self.tensors)

    @property
    def failed(self) -> list[TensorCheck]:
        """The tensors whose gradient is wrong, worst first."""
        return sorted((t for t in self.tensors if t.status == FAILED), key=lambda t: -t.max_rel_error)

    @property
    def nondifferentiable(self) -> list[TensorCheck]:
        """The tensors where the perturbation hit a kink."""
        return [t for t in self.tensors if t.status == NONDIFFERENTIABLE]

    def by_module(self, depth: int | None = None) -> dict[str, dict[str, Any]]:
        """Aggregate per module (its name cut to ``depth`` components, ``None``: the owning module itself):
        ``{module: {"tensors", "failed", "max_rel_error", "passed"}}``."""
        return self._aggregate(lambda t: ".".join(t.module.split(".")[:depth]) if depth else t.module)

    def by_modality(self) -> dict[str, dict[str, Any]]:
        """Aggregate per modality (``"shared"`` for parameters outside the encoders, ``"input"`` for inputs)."""
        return self._aggregate(lambda t: t.modality or ("input" if t.name.startswith("input:") else "shared"))

    def worst_modules(self, count: int = 3, depth: int | None = None) -> list[str]:
        """Names of the modules with failed tensors, worst relative error first."""
        groups = self.by_module(depth)
        failing = [(name, g["max_rel_error"]) for name, g in groups.items() if g["failed"]]
        return [name for name, _ in sorted(failing, key=lambda item: -item[1])[:count]]

    def _aggregate(self, key: Any) -> dict[str, dict[str, Any]]:
        groups: dict[str, dict[str, Any]] = defaultdict(
            lambda: {"tensors": 0, "failed": 0, "nondifferentiable": 0, "max_rel_error": 0.0}
        )
        for t in self.tensors:
            g = groups[key(t)]
            g["tensors"] += 1
            g["failed"] += t.status == FAILED
            g["nondifferentiable"] += t.status == NONDIFFERENTIABLE
            g["max_rel_error"] = max(g["max_rel_error"], t.max_rel_error)
        for g in groups.values():
            g["passed"] = g["failed"] == 0
        return dict(groups)

    def to_dict(self) -> dict[str, Any]:
        """Everything, as plain data (for JSON or a logger)."""
        return {
            "passed": self.passed,
            "eps": self.eps,
            "rtol": self.rtol,
            "atol": self.atol,
            "loss": self.loss,
            "seconds": self.seconds,
            "evaluations": self.evaluations,
            "by_modality": self.by_modality(),
            "tensors": [asdict(t) for t in self.tensors],
        }

    def table(self, rows: int | None = 20, names: Sequence[str] | None = None) -> str:
        """A text table of the tensors, failed first, then by relative error."""
        chosen = [t for t in self.tensors if names is None or t.name in names]
        chosen.sort(key=lambda t: (t.status != FAILED, t.status != NONDIFFERENTIABLE, -t.max_rel_error))
        shown = chosen[:rows] if rows else chosen
        width = max([len("tensor"), *(len(t.name) for t in shown)])
        lines = [f"{'tensor':<{width}}  {'modality':<8}  {'mode':<10}  {'n':>4}  {'max abs err':>11}  "
                 f"{'max rel err':>11}  status"]
        for t in shown:
            lines.append(
                f"{t.name:<{width}}  {t.modality or '-':<8}  {t.mode:<10}  {t.checks:>4}  {t.max_abs_error:>11.2e}  "
                f"{t.max_rel_error:>11.2e}  {t.status}"
            )
        if rows and len(chosen) > rows:
            lines.append(f"... {len(chosen) - rows} more tensors (all {'passed' if self.passed else 'listed in to_dict()'})")
        return "\n".join(lines)

    def __str__(self) -> str:
        verdict = "PASSED" if self.passed else f"FAILED ({len(self.failed)} tensors)"
        head = (
            f"Gradient check {verdict}: {len(self.tensors)} tensors, {self.evaluations} loss evaluations in "
            f"{self.seconds:.1f} s (eps={self.eps:g}, rtol={self.rtol:g}, atol={self.atol:g}, loss={self.loss:.4g})"
        )
        if self.nondifferentiable:
            head += f"\n{len(self.nondifferentiable)} tensors hit non-differentiable points (kinks): not counted as failures"
        if not self.passed:
            head += f"\nworst modules: {', '.join(self.worst_modules())}"
        return head + "\n" + self.table()
