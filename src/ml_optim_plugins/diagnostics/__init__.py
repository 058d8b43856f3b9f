"""Training diagnostics: overfit-one-batch check, loss and LR curves, curvature probe."""

from ml_optim_plugins.diagnostics.curvature import CurvatureProbe, HessianEigenvalues, hessian_top_eigenvalue
from ml_optim_plugins.diagnostics.curves import TrainingCurves
from ml_optim_plugins.diagnostics.overfit import OverfitBatchCheck

__all__ = ["CurvatureProbe", "HessianEigenvalues", "OverfitBatchCheck", "TrainingCurves", "hessian_top_eigenvalue"]
