"""Gradient checking (numerical vs analytical, whole model) and gradient health monitoring."""

from ml_optim_plugins.gradcheck.callback import GradientCheck
from ml_optim_plugins.gradcheck.core import check_gradients
from ml_optim_plugins.gradcheck.monitor import GradientMonitor
from ml_optim_plugins.gradcheck.report import GradCheckReport, TensorCheck
from ml_optim_plugins.step_loss import training_step_loss

__all__ = [
    "GradCheckReport",
    "GradientCheck",
    "GradientMonitor",
    "TensorCheck",
    "check_gradients",
    "training_step_loss",
]
