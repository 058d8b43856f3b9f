"""Simple baselines on frozen features, beside the trained model: kNN and elastic-net logistic regression on each
modality's pretrained encoder features and on their concatenation (``ml-optim-plugins baselines -c RECIPE``).

A deep model earns trust by beating what a few lines of scikit-learn do with the same pretrained features. The
functional core (:func:`extract_features`, :func:`fit_baselines`, in ``core.py``) needs no Trainer; ``report.py``
renders the rows (:func:`baselines_table`, :func:`baselines_markdown`); :func:`run_baselines` (``command.py``) builds
the recipe's model and data with the recipe CLI, calls the core and scores the recipe's trained checkpoint beside it.
"""

from ml_optim_plugins.baselines.command import run_baselines
from ml_optim_plugins.baselines.core import (
    C_VALUES,
    K_VALUES,
    L1_RATIOS,
    METRICS,
    BaselineResult,
    LabelledFeatures,
    extract_features,
    fit_baselines,
)
from ml_optim_plugins.baselines.report import BaselineReport, baselines_markdown, baselines_table

__all__ = [
    "C_VALUES",
    "K_VALUES",
    "L1_RATIOS",
    "METRICS",
    "BaselineReport",
    "BaselineResult",
    "LabelledFeatures",
    "baselines_markdown",
    "baselines_table",
    "extract_features",
    "fit_baselines",
    "run_baselines",
]
