"""What a run does with a training step whose loss or gradients are not finite: one decision for the whole run.

Three parts meet a NaN/Inf: :class:`~ml_optim_plugins.MultimodalClassifier` computes the loss,
:class:`~ml_optim_plugins.GradientMonitor` checks the gradients, :class:`~ml_optim_plugins.ModalityBalancer` rescales
them. They follow one policy, read by :func:`nonfinite_policy`: the ``on_nonfinite`` of a callback that declares one
(``GradientMonitor``), else ``"raise"``. So attaching ``GradientMonitor(on_nonfinite="skip_step")`` is the one switch
that makes a run skip such steps instead of stopping. docs/gradcheck.md has the table of combinations.
"""

from __future__ import annotations

from typing import Any

ON_NONFINITE = ("raise", "skip_step", "warn")


def nonfinite_policy(trainer: Any | None) -> str:
    """The run's policy for a training step with a non-finite loss or gradients: ``"raise"``, ``"skip_step"`` or
    ``"warn"``.

    It is the ``on_nonfinite`` of the first of ``trainer.callbacks`` that declares one (a
    :class:`~ml_optim_plugins.GradientMonitor`, which then skips the step or warns), else ``"raise"`` (also without a
    trainer). Float16 AMP is separate: its GradScaler skips steps with non-finite gradients on its own
    (:func:`scaler_skips_nonfinite`).

    Example:
        >>> from types import SimpleNamespace
        >>> nonfinite_policy(None), nonfinite_policy(SimpleNamespace(callbacks=[]))
        ('raise', 'raise')
        >>> nonfinite_policy(SimpleNamespace(callbacks=[SimpleNamespace(on_nonfinite="skip_step")]))
        'skip_step'
    """
    for callback in getattr(trainer, "callbacks", None) or []:
        policy = getattr(callback, "on_nonfinite", None)
        if policy in ON_NONFINITE:
            return policy
    return "raise"


def scaler_skips_nonfinite(trainer: Any) -> bool:
    """Whether float16 AMP's GradScaler is active: it skips a step with non-finite gradients itself (and lowers its
    scale), so such a step is expected now and then and is neither raised nor skipped by the library."""
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    return scaler is not None and (not hasattr(scaler, "is_enabled") or scaler.is_enabled())
