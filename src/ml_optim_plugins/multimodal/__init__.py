"""The modality contract, encoders, fusion modules and the MultimodalClassifier."""

from ml_optim_plugins.multimodal.classifier import MultimodalClassifier
from ml_optim_plugins.multimodal.contract import ModalityAware, SplittableEncoder, require_modality_aware
from ml_optim_plugins.multimodal.encoders import SentenceTransformerTextEncoder, TimmImageEncoder
from ml_optim_plugins.multimodal.fusion import ConcatFusion, Fusion, GatedFusion, SumFusion
from ml_optim_plugins.multimodal.mixin import ModalityAwareMixin
from ml_optim_plugins.text_models import packaged_minilm_path, resolve_text_model

__all__ = [
    "ConcatFusion",
    "Fusion",
    "GatedFusion",
    "ModalityAware",
    "ModalityAwareMixin",
    "MultimodalClassifier",
    "SentenceTransformerTextEncoder",
    "SplittableEncoder",
    "SumFusion",
    "TimmImageEncoder",
    "packaged_minilm_path",
    "require_modality_aware",
    "resolve_text_model",
]
