"""The caches of a staged-finetuning run: built and checked at setup, handed to the module, following each stage's
frozen set, told which split is running, and taken back at teardown."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from ml_optim_plugins.finetuning.activation_cache import ActivationCache, activation_splits
from ml_optim_plugins.finetuning.cache import FeatureCache, entirely_frozen
from ml_optim_plugins.finetuning.plan import FinetuningPlan
from ml_optim_plugins.multimodal.contract import supports_activation_cache, supports_feature_cache


class StageCaches:
    """The :class:`~ml_optim_plugins.finetuning.FeatureCache` (entirely frozen encoders) and the
    :class:`~ml_optim_plugins.finetuning.ActivationCache` (frozen lower blocks) of a
    :class:`~ml_optim_plugins.StagedFinetuning` run, each present only when asked for.

    Args:
        features: keep a feature cache.
        activations: keep an activation cache.
        directory: memory-mapped files under this directory (one subdirectory per process); ``None``: in memory.
        verify: recompute the first fully cached batch of each split and modality and raise if it differs.

    Example:
        >>> caches = StageCaches(features=True, activations=False)
        >>> caches.features is None, caches.activations is None, caches.state_dict()["activation_cache"]
        (True, True, None)
    """

    def __init__(self, features: bool, activations: bool, directory: Path | None = None, verify: bool = True) -> None:
        self.want_features, self.want_activations = features, activations
        self.directory, self.verify = directory, verify
        self.features: FeatureCache | None = None
        self.activations: ActivationCache | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, plan: FinetuningPlan) -> None:
        """Build the caches asked for, check that ``pl_module`` and the data allow them for every stage of ``plan``,
        and hand them to the module (its ``feature_cache`` / ``activation_cache`` attributes).

        Raises:
            MisconfigurationException: a module without ``encode_modality`` or the cache attribute; augmented
                training images where the image encoder's features or lower blocks would be cached; with activations,
                a partly frozen encoder that cannot be split.
        """
        rank = f"rank{trainer.global_rank}"
        if self.want_features:
            if not supports_feature_cache(pl_module):
                raise MisconfigurationException(
                    f"StagedFinetuning(cache_features=True) needs a module that encodes through encode_modality() and "
                    f"has a feature_cache attribute (ModalityAwareMixin); {type(pl_module).__name__} has not"
                )
            self._check_features(trainer, pl_module, plan)
            self.features = FeatureCache(None if self.directory is None else self.directory / rank, verify=self.verify)
            pl_module.feature_cache = self.features
        if self.want_activations:
            self._check_activations(trainer, pl_module, plan)
            directory = None if self.directory is None else self.directory / "activations" / rank
            self.activations = ActivationCache(directory, verify=self.verify)
            pl_module.activation_cache = self.activations

    @staticmethod
    def _check_features(trainer: pl.Trainer, pl_module: pl.LightningModule, plan: FinetuningPlan) -> None:
        # Random crops of the training images would be cached once and served as they were drawn in the first epoch
        # (or, with verify, refused at the second epoch's first batch, an epoch of training later): refused here.
        image = dict(pl_module.modality_encoders()).get("image")
        if image is None or not _augments(trainer):
            return
        for index, trainable in enumerate(plan.trainable):
            if entirely_frozen(image, trainable):  # the cache would serve its features
                raise MisconfigurationException(
                    f"StagedFinetuning(cache_features=True): stage {index} ({plan.stage_name(index)}) keeps the image "
                    f"encoder frozen and would cache its features, but {type(trainer.datamodule).__name__} augments the "
                    "training images (augment=True), so they differ in every epoch. Set augment=False in the data "
                    "module, or cache_features=False (the frozen encoder then runs on every batch)"
                )

    @staticmethod
    def _check_activations(trainer: pl.Trainer, pl_module: pl.LightningModule, plan: FinetuningPlan) -> None:
        if not supports_activation_cache(pl_module):
            raise MisconfigurationException(
                "StagedFinetuning(cache_activations=True) needs a module that encodes through encode_modality() and "
                f"has an activation_cache attribute (ModalityAwareMixin); {type(pl_module).__name__} has not"
            )
        augment = _augments(trainer)
        for index, trainable in enumerate(plan.trainable):
            try:
                splits = activation_splits(pl_module.modality_encoders(), trainable)
            except (TypeError, ValueError) as err:
                raise MisconfigurationException(
                    f"StagedFinetuning(cache_activations=True): stage {index} ({plan.stage_name(index)}) trains only "
                    f"part of an encoder, whose frozen lower blocks would be cached, but {err}"
                ) from err
            if "image" in splits and augment:
                raise MisconfigurationException(
                    f"StagedFinetuning(cache_activations=True): stage {index} ({plan.stage_name(index)}) would cache "
                    f"the image encoder's lower blocks, but {type(trainer.datamodule).__name__} augments the training "
                    "images (augment=True), so they differ in every epoch. Set augment=False in the data module, or "
                    "cache_activations=False"
                )

    def follow(self, pl_module: pl.LightningModule, trainable: Collection[int]) -> list[nn.Module]:
        """Serve what the new frozen set (everything managed but ``trainable``) allows and drop the rest; returns the
        cached lower blocks, to be kept in ``eval()`` like frozen modules (parameter-free ones included)."""
        if self.features is None and self.activations is None:
            return []
        encoders = pl_module.modality_encoders()
        if self.features is not None:
            self.features.follow_frozen(encoders, trainable)
        if self.activations is None:
            return []
        self.activations.follow_frozen(encoders, trainable)
        return self.activations.frozen_blocks(encoders)

    def describe(self) -> str:
        """What the activation cache serves, for the stage's log line ("" when nothing)."""
        splits = {} if self.activations is None else self.activations.splits
        return f"; lower blocks' activations cached (modality: first trainable block) {splits}" if splits else ""

    def set_split(self, split: str, dataloader_idx: int = 0) -> None:
        """Tell the caches which split's samples come next (``val1`` for a second validation loader)."""
        for cache in (self.features, self.activations):
            if cache is not None:
                cache.split = split if dataloader_idx == 0 else f"{split}{dataloader_idx}"

    def teardown(self, pl_module: pl.LightningModule) -> None:
        """Take the caches back from the module (a later ``validate`` or ``test`` encodes without them)."""
        if self.features is not None and getattr(pl_module, "feature_cache", None) is self.features:
            pl_module.feature_cache = None
        if self.activations is not None and getattr(pl_module, "activation_cache", None) is self.activations:
            pl_module.activation_cache = None

    def state_dict(self) -> dict[str, Any]:
        """What the caches served and their hit counts, for the checkpoint (informative: a resumed run rebuilds its
        caches from the data)."""
        features, activations = self.features, self.activations
        return {
            "cache": None if features is None else {"active": features.active, "stats": features.stats()},
            "activation_cache": None if activations is None else {"splits": activations.splits,
                                                                  "stats": activations.stats()},
        }


def _augments(trainer: pl.Trainer) -> bool:
    """Whether the run's data module draws random image augmentation (its ``augment`` hyperparameter)."""
    return bool(getattr(getattr(trainer, "datamodule", None), "hparams", {}).get("augment", False))
