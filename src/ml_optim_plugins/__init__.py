"""ml-optim-plugins: PyTorch Lightning plugins for optimizing deep multimodal networks.

Everything a user imports is exported here; other module paths may change between releases.
"""

from ml_optim_plugins.data import (
    ManifestDataModule,
    ManifestError,
    MultimodalCollate,
    MultimodalDataModule,
    SyntheticSentimentDataModule,
    SyntheticSentimentDataset,
    load_tokenizer,
)
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
    packaged_minilm_path,
    require_modality_aware,
    resolve_text_model,
)
from ml_optim_plugins.schedules import (
    COOLDOWN_SHAPES,
    DECAY_SHAPES,
    WARMUP_SHAPES,
    WarmupDecay,
    WarmupDecayLR,
    WarmupDecaySchedule,
    warmup_decay_scheduler,
    warmup_factor,
)

__version__ = "0.1.0"

__all__ = [
    "COOLDOWN_SHAPES",
    "DECAY_SHAPES",
    "WARMUP_SHAPES",
    "ConcatFusion",
    "Fusion",
    "GatedFusion",
    "ManifestDataModule",
    "ManifestError",
    "ModalityAware",
    "ModalityAwareMixin",
    "MultimodalClassifier",
    "MultimodalCollate",
    "MultimodalDataModule",
    "SentenceTransformerTextEncoder",
    "SumFusion",
    "SyntheticSentimentDataModule",
    "SyntheticSentimentDataset",
    "TimmImageEncoder",
    "WarmupDecay",
    "WarmupDecayLR",
    "WarmupDecaySchedule",
    "__version__",
    "load_tokenizer",
    "packaged_minilm_path",
    "require_modality_aware",
    "resolve_text_model",
    "warmup_decay_scheduler",
    "warmup_factor",
]
