"""ml-optim-plugins: PyTorch Lightning plugins for optimizing deep multimodal networks.

The names a user needs are exported here, grouped by what they do: the model and its parts, the data modules, and
each method's callbacks, modules and configuration. The methods' pure-torch functional cores are in
:mod:`ml_optim_plugins.functional`; everything else is in its subpackage (``ml_optim_plugins.balancing``,
``ml_optim_plugins.data``, ...), whose ``__all__`` lists it. Other module paths may change between releases.

Example:
    >>> import ml_optim_plugins as mop
    >>> callbacks = [mop.WarmupDecay(warmup_steps=100), mop.ModalityBalancer("ogm_ge", alpha=0.5)]
    >>> [type(c).__name__ for c in callbacks]
    ['WarmupDecay', 'ModalityBalancer']
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from typing import Any

from ml_optim_plugins import functional
from ml_optim_plugins.balancing import ModalityBalancer
from ml_optim_plugins.data import (
    ManifestDataModule,
    MultimodalDataModule,
    MVSADataModule,
    SyntheticSentimentDataModule,
)
from ml_optim_plugins.diagnostics import CurvatureProbe, OverfitBatchCheck, RunReport, TrainingCurves
from ml_optim_plugins.finetuning import GradualUnfreezing, LinearProbeFinetune, Stage, StagedFinetuning
from ml_optim_plugins.gradcheck import GradientCheck, GradientMonitor, check_gradients
from ml_optim_plugins.multimodal import (
    ConcatFusion,
    Fusion,
    GatedFusion,
    ModalityAware,
    ModalityAwareMixin,
    MultimodalClassifier,
    SentenceTransformerTextEncoder,
    SumFusion,
    TimmImageEncoder,
)
from ml_optim_plugins.prediction import PredictionWriter, Predictor
from ml_optim_plugins.regularization import (
    ElasticNetPenalty,
    GaussianDropout,
    ModalityDropout,
    VariationalGaussianDropout,
    VariationalKL,
    replace_dropout,
)
from ml_optim_plugins.resume import ExactResume
from ml_optim_plugins.schedules import WarmupDecay, warmup_decay_scheduler

__version__ = "0.1.0"

__all__ = [
    # The package: its version and the functional cores' namespace
    "__version__",
    "functional",
    # The model: the modality contract, the classifier, its encoders and fusions
    "ConcatFusion",
    "Fusion",
    "GatedFusion",
    "ModalityAware",
    "ModalityAwareMixin",
    "MultimodalClassifier",
    "SentenceTransformerTextEncoder",
    "SumFusion",
    "TimmImageEncoder",
    # Data modules
    "MVSADataModule",
    "ManifestDataModule",
    "MultimodalDataModule",
    "SyntheticSentimentDataModule",
    # Learning-rate warmup and decay
    "WarmupDecay",
    "warmup_decay_scheduler",
    # Regularization
    "ElasticNetPenalty",
    "GaussianDropout",
    "ModalityDropout",
    "VariationalGaussianDropout",
    "VariationalKL",
    "replace_dropout",
    # Gradient checking and gradient health
    "GradientCheck",
    "GradientMonitor",
    "check_gradients",
    # Modality balancing
    "ModalityBalancer",
    # Staged finetuning
    "GradualUnfreezing",
    "LinearProbeFinetune",
    "Stage",
    "StagedFinetuning",
    # Diagnostics and run reports
    "CurvatureProbe",
    "OverfitBatchCheck",
    "RunReport",
    "TrainingCurves",
    # Runs and predictions
    "ExactResume",
    "PredictionWriter",
    "Predictor",
]

# Exported here up to 0.1.0, now only from their home (the functional cores from `functional`): still importable from
# the top level for one release, with a DeprecationWarning naming the new import.
_MOVED: dict[str, str] = {
    **dict.fromkeys(
        ["agm_coefficients", "elastic_net_penalty", "gaussian_dropout", "hessian_top_eigenvalue", "kl_kingma",
         "kl_molchanov", "mmpareto_combine", "mmpareto_weights", "modality_keep_mask", "modulate_gradient",
         "mono_modal_losses", "ogm_ge_coefficients", "true_class_scores", "variational_kl", "warmup_factor"],
        "ml_optim_plugins.functional",
    ),
    "mmpareto_weights_from_dots": "ml_optim_plugins.balancing",
    **dict.fromkeys(
        ["BaselineReport", "BaselineResult", "LabelledFeatures", "baselines_markdown", "baselines_table",
         "extract_features", "fit_baselines", "run_baselines"],
        "ml_optim_plugins.baselines",
    ),
    **dict.fromkeys(
        ["EpochShuffle", "ManifestError", "MultimodalCollate", "SyntheticSentimentDataset", "clean_mvsa_labels",
         "load_tokenizer", "read_mvsa"],
        "ml_optim_plugins.data",
    ),
    **dict.fromkeys(["HessianEigenvalues", "MetricHistory"], "ml_optim_plugins.diagnostics"),
    **dict.fromkeys(
        ["FeatureCache", "encoder_blocks", "module_fingerprint", "select_parameters"], "ml_optim_plugins.finetuning"
    ),
    **dict.fromkeys(["GradCheckReport", "TensorCheck", "training_step_loss"], "ml_optim_plugins.gradcheck"),
    **dict.fromkeys(
        ["SplittableEncoder", "packaged_minilm_path", "require_modality_aware", "resolve_text_model"],
        "ml_optim_plugins.multimodal",
    ),
    "destroy_default_process_group": "ml_optim_plugins.process_group",
    "nonfinite_policy": "ml_optim_plugins.nonfinite",
    "Prediction": "ml_optim_plugins.prediction",
    "seed_per_rank": "ml_optim_plugins.rank_seed",
    **dict.fromkeys(
        ["DropoutReplacement", "PenaltyCallback", "VariationalLinear", "regularized_parameters"],
        "ml_optim_plugins.regularization",
    ),
    **dict.fromkeys(
        ["COOLDOWN_SHAPES", "DECAY_SHAPES", "WARMUP_SHAPES", "WarmupDecayLR", "WarmupDecaySchedule"],
        "ml_optim_plugins.schedules",
    ),
}


def _probed_for_import_path() -> bool:
    """Whether the caller of ``__getattr__`` is jsonargparse's ``get_import_path``, which probes each package above a
    class's module for the shortest path to write in a config (it must find the new home, not the deprecated one)."""
    frame = inspect.currentframe()
    caller = frame.f_back.f_back if frame and frame.f_back else None
    return bool(caller) and caller.f_code.co_name == "get_import_path" and str(
        caller.f_globals.get("__name__", "")
    ).startswith("jsonargparse")


def __getattr__(name: str) -> Any:
    """A name that moved out of the top level, from its new home, with a ``DeprecationWarning`` that names it."""
    home = _MOVED.get(name)
    if home is None or _probed_for_import_path():
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"ml_optim_plugins.{name} is deprecated and leaves the top level in the next release; "
        f"import it as `from {home} import {name}`",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(home), name)


def __dir__() -> list[str]:
    return list(__all__)
