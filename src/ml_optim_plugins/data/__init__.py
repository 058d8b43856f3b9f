"""Built-in synthetic data, manifest (CSV / JSONL) data, MVSA, and the shared data-module base."""

from ml_optim_plugins.data.base import EpochShuffle, MultimodalDataModule
from ml_optim_plugins.data.collate import MultimodalCollate, load_tokenizer
from ml_optim_plugins.data.manifest import ManifestDataModule, ManifestError
from ml_optim_plugins.data.mvsa import MVSADataModule, clean_mvsa_labels, read_mvsa
from ml_optim_plugins.data.synthetic import SyntheticSentimentDataModule, SyntheticSentimentDataset

__all__ = [
    "EpochShuffle",
    "MVSADataModule",
    "ManifestDataModule",
    "ManifestError",
    "MultimodalCollate",
    "MultimodalDataModule",
    "SyntheticSentimentDataModule",
    "SyntheticSentimentDataset",
    "clean_mvsa_labels",
    "load_tokenizer",
    "read_mvsa",
]
