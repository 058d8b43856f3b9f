"""Training diagnostics: overfit-one-batch check, loss and LR curves, run reports, curvature probe."""

from ml_optim_plugins.diagnostics.curvature import CurvatureProbe, HessianEigenvalues, hessian_top_eigenvalue
from ml_optim_plugins.diagnostics.curves import TrainingCurves
from ml_optim_plugins.diagnostics.history import MetricHistory
from ml_optim_plugins.diagnostics.overfit import OverfitBatchCheck
from ml_optim_plugins.diagnostics.report import RunReport

__all__ = ["CurvatureProbe", "HessianEigenvalues", "MetricHistory", "OverfitBatchCheck", "RunReport", "TrainingCurves", "hessian_top_eigenvalue"]
