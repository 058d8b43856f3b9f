"""Built-in synthetic data, manifest (CSV / JSONL) data, and the shared data-module base."""

from ml_optim_plugins.data.base import MultimodalDataModule
from ml_optim_plugins.data.collate import MultimodalCollate, load_tokenizer
from ml_optim_plugins.data.manifest import ManifestDataModule, ManifestError
from ml_optim_plugins.data.synthetic import SyntheticSentimentDataModule, SyntheticSentimentDataset

__all__ = [
    "ManifestDataModule",
    "ManifestError",
    "MultimodalCollate",
    "MultimodalDataModule",
    "SyntheticSentimentDataModule",
    "SyntheticSentimentDataset",
    "load_tokenizer",
]
