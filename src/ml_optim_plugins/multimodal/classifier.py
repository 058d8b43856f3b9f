"""MultimodalClassifier: a LightningModule of per-modality encoders, a fusion (with its head) and metrics."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from ml_optim_plugins.hyperparameters import check_number
from ml_optim_plugins.metric_names import SPLITS, metric_key, metric_prefix
from ml_optim_plugins.multimodal.mixin import ModalityAwareMixin
from ml_optim_plugins.multimodal.epoch_states import load_rank_states, save_rank_states
from ml_optim_plugins.multimodal.fusion import ConcatFusion, Fusion
from ml_optim_plugins.nonfinite import nonfinite_policy
from ml_optim_plugins.rank_seed import seed_per_rank

FUSED = "fused"


def _is_plain_data(value: Any) -> bool:
    """Whether ``value`` is YAML-like data (what a config holds), not a module or a callable."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _is_plain_data(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_is_plain_data(v) for v in value)
    return False


def check_learning_rates(optimizer: torch.optim.Optimizer) -> None:
    """Refuse an optimizer whose learning rates are not finite and >= 0, or are all 0 (nothing would train; a group
    at 0 beside others is a deliberate gate, e.g. a frozen encoder).

    Raises:
        ValueError: naming the param group and its learning rate.

    Example:
        >>> check_learning_rates(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.0))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: every param group of SGD has lr=0, so no weight would change; set the optimizer's lr > 0 ...
    """
    rates = []
    for index, group in enumerate(optimizer.param_groups):
        lr = group.get("lr")
        lr = float(lr) if isinstance(lr, torch.Tensor) else lr
        rates.append(check_number(f"the learning rate of param group {group.get('name', index)!r}", lr, at_least=0))
    if rates and not any(rates):
        raise ValueError(
            f"every param group of {type(optimizer).__name__} has lr=0, so no weight would change; set the optimizer's "
            "lr > 0 (in a recipe: model.init_args.optimizer.init_args.lr)"
        )


class MultimodalClassifier(ModalityAwareMixin, pl.LightningModule):
    """Classify samples from several modalities: encode each, fuse, predict; implements the modality contract.

    The batch is a mapping with one entry per modality name (the keys of ``encoders``) plus ``label_key``.
    ``training_step`` records the per-modality logits and targets for callbacks (:class:`ModalityAware`). Every split
    logs epoch aggregates of the fused prediction (``{split}/loss``, ``acc``, ``f1`` (macro), ``f1_weighted``) and of
    each modality's own prediction (``{split}/{modality}/...``); under DDP every logged value is the global one.
    Subclass it to change the loss (:meth:`compute_loss`, :meth:`compute_modality_loss`), the metrics
    (:meth:`build_metrics`) or the batch layout (:meth:`compute_features`); docs/index.md shows a subclass run through
    a recipe, docs/compatibility.md what it guarantees under DDP.

    Args:
        encoders: ``{modality: encoder}``; each encoder reports ``output_dim`` (or give ``feature_dims``).
        fusion: a :class:`Fusion` (not yet built; it is built here for the encoders' sizes). Default: ConcatFusion.
        num_classes: number of classes (LightningCLI links it from the data module).
        optimizer: a callable ``param groups -> Optimizer`` (LightningCLI: ``class_path`` + ``init_args``), called
            with :meth:`param_groups` (one named group per encoder, one for the fusion). ``None``:
            AdamW, lr 1e-3, weight decay 0.01.
        lr_scheduler: optional callable ``optimizer -> LRScheduler``.
        scheduler_interval: ``"step"`` or ``"epoch"``: when Lightning steps ``lr_scheduler``.
        feature_dims: override of the feature size per modality, for encoders without ``output_dim``.
        label_key: the batch key of the targets.
        class_names: optional names of the classes, saved with the hyperparameters.
        modality_dropout: a module applied in training to the features dict before the fusion, e.g.
            :class:`~ml_optim_plugins.ModalityDropout`; the per-modality predictions recorded for callbacks are computed
            from the features before it.
        aux_loss_weight: with a value > 0, each modality gets its own linear head and cross-entropy, and their sum
            times this weight is added to the training objective (unimodal auxiliary losses, docs/methods.md).
            ``{split}/loss`` stays the fused loss; ``{split}/{modality}/aux_loss`` is logged.
        modality_scoring: how the per-modality predictions that callbacks read are obtained: ``"auto"``,
            ``"head_split"``, ``"masking"`` or ``"aux_heads"`` (see :meth:`set_modality_scoring`).
        preprocessing: how the data prepares inputs for this model (a data module's
            :attr:`~ml_optim_plugins.MultimodalDataModule.preprocessing`; LightningCLI links it), kept with the
            hyperparameters so a checkpoint alone can classify new inputs (:class:`~ml_optim_plugins.Predictor`).

    Raises:
        ValueError: an argument that does not fit the encoders, the classes or the fusion (the message names it); at
            ``configure_optimizers``, learning rates that are not finite and >= 0, or all 0.
        TypeError: ``fusion`` is not a :class:`Fusion`.
        FloatingPointError: a non-finite loss, unless the run's :func:`~ml_optim_plugins.nonfinite.nonfinite_policy` skips or
            warns about a training step (docs/gradcheck.md).

    Example:
        >>> from ml_optim_plugins import SumFusion
        >>> model = MultimodalClassifier(
        ...     {"a": torch.nn.Linear(4, 8), "b": torch.nn.Linear(6, 8)},
        ...     fusion=SumFusion(), num_classes=3, feature_dims={"a": 8, "b": 8},
        ... )
        >>> batch = {"a": torch.randn(5, 4), "b": torch.randn(5, 6), "label": torch.tensor([0, 1, 2, 0, 1])}
        >>> model(batch).shape
        torch.Size([5, 3])
    """

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        fusion: Fusion | None = None,
        num_classes: int = 3,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "step",
        feature_dims: Mapping[str, int] | None = None,
        label_key: str = "label",
        class_names: Sequence[str] | None = None,
        modality_dropout: nn.Module | None = None,
        aux_loss_weight: float = 0.0,
        modality_scoring: str = "auto",
        preprocessing: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`")
            self.save_hyperparameters()
        # From LightningCLI the hyperparameters are the config (class paths and arguments), which lets
        # `validate --ckpt_path` rebuild the model; from Python they are live modules and callables: not saved.
        self.remove_ignored_hparams([key for key, value in self.hparams.items() if not _is_plain_data(value)])
        if not encoders:
            raise ValueError("encoders is empty; give at least one {modality: encoder}")
        if label_key in encoders:
            raise ValueError(f"label_key {label_key!r} is also a modality name; rename one of them")
        if scheduler_interval not in ("step", "epoch"):
            raise ValueError(f"scheduler_interval={scheduler_interval!r}; expected 'step' or 'epoch'")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class_names for num_classes={num_classes}")
        self.encoders = nn.ModuleDict(dict(encoders))
        dims = dict(feature_dims or {})
        unknown = sorted(set(dims) - set(self.encoders))
        if unknown:
            raise ValueError(f"feature_dims names {unknown} do not match the encoders {sorted(self.encoders)}")
        for name, encoder in self.encoders.items():
            if name not in dims:
                if not hasattr(encoder, "output_dim"):
                    raise ValueError(
                        f"encoder {name!r} ({type(encoder).__name__}) has no output_dim; pass feature_dims={{{name!r}: size}}"
                    )
                dims[name] = int(encoder.output_dim)
        self.fusion = fusion if fusion is not None else ConcatFusion()
        if not isinstance(self.fusion, Fusion):
            raise TypeError(f"fusion must be an ml_optim_plugins Fusion, got {type(self.fusion).__name__}")
        self.fusion.build(dims, num_classes)
        self.num_classes = num_classes
        self.class_names = None if class_names is None else list(class_names)
        self.preprocessing = None if preprocessing is None else dict(preprocessing)
        self.label_key = label_key
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.scheduler_interval = scheduler_interval
        self.modality_dropout = modality_dropout
        self.aux_loss_weight = check_number("aux_loss_weight", aux_loss_weight, at_least=0)
        self.aux_heads = (
            nn.ModuleDict({name: nn.Linear(dim, num_classes) for name, dim in dims.items()})
            if aux_loss_weight > 0
            else None
        )
        self.set_modality_scoring(modality_scoring)
        metrics = MetricCollection(dict(self.build_metrics()))
        losses = ["loss", *(f"{name}/loss" for name in self.encoders)]
        losses += [f"{name}/aux_loss" for name in self.aux_heads or {}]
        self.eval_losses = nn.ModuleDict(
            {f"{split}/{loss}": MeanMetric(nan_strategy="disable") for split in ("val", "test") for loss in losses}
        )
        # The training epoch's running means and metric states are saved in checkpoints (persistent), so an epoch
        # resumed in its middle reports the figures of the whole epoch, as an uninterrupted run does.
        self.train_losses = nn.ModuleDict({f"train/{loss}": MeanMetric(nan_strategy="disable") for loss in losses})
        self.metrics = nn.ModuleDict(
            {
                f"{split}_{head}": metrics.clone(prefix=metric_prefix(split, None if head == FUSED else head))
                for split in SPLITS
                for head in (FUSED, *self.encoders)
            }
        )
        for module in self._training_epoch_states():
            module.persistent(True)

    def build_metrics(self) -> Mapping[str, Metric]:
        """The metrics of every head (fused and per modality) and split, by name: ``{split}/{name}`` and
        ``{split}/{modality}/{name}``. Called once in ``__init__`` (``self.num_classes`` is set); override and extend
        ``super().build_metrics()`` to add one. Each metric is updated with ``(logits, targets)``."""
        return {
            "acc": MulticlassAccuracy(self.num_classes, average="micro"),
            "f1": MulticlassF1Score(self.num_classes, average="macro"),
            "f1_weighted": MulticlassF1Score(self.num_classes, average="weighted"),
        }

    def compute_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The loss of the fused prediction, logged as ``{split}/loss`` and trained on: cross-entropy. Override it to
        change the training objective (label smoothing, class weights, focal loss)."""
        return F.cross_entropy(logits, targets)

    def compute_modality_loss(self, modality: str, logits: Tensor, targets: Tensor) -> Tensor:
        """The loss of one modality's own prediction: the auxiliary heads' objective (``aux_loss_weight``) and the
        logged ``{split}/{modality}/loss``. Default: :meth:`compute_loss`, so both stay comparable."""
        return self.compute_loss(logits, targets)

    @property
    def modalities(self) -> list[str]:
        """The modality names, in encoder order."""
        return list(self.encoders)

    def compute_features(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Encode each modality of ``batch``: ``{modality: (batch, dim)}`` (through the feature cache of frozen
        encoders, when :class:`~ml_optim_plugins.StagedFinetuning` set one up)."""
        missing = [name for name in self.encoders if name not in batch]
        if missing:
            raise KeyError(f"batch lacks modalities {missing}; it has keys {sorted(batch)}")
        ids = batch.get(self.sample_id_key)
        return {name: self.encode_modality(name, batch[name], ids) for name in self.encoders}

    def forward(self, batch: Mapping[str, Any]) -> Tensor:
        """Fused logits ``(batch, num_classes)``."""
        return self.fusion(self.compute_features(batch))

    def step(self, batch: Mapping[str, Any], split: str) -> Tensor:
        """Shared body of the train / val / test steps: the objective (fused loss plus the weighted auxiliary
        unimodal losses, if any), with metrics per head."""
        targets = batch[self.label_key]
        features = self.compute_features(batch)
        if self.modality_dropout is not None and self.training:
            logits = self.fusion(self.modality_dropout(features))
        else:
            logits = self.fusion(features)
        loss = self.compute_loss(logits, targets)
        batch_size = targets.shape[0]
        objective = loss
        aux_losses = {}
        if self.aux_heads is not None:
            self.modality_losses = {}
            for name, head in self.aux_heads.items():
                aux_losses[name] = self.compute_modality_loss(name, head(features[name]), targets)
                if split == "train":
                    self.modality_losses[name] = aux_losses[name]
                objective = objective + self.aux_loss_weight * aux_losses[name]
        if split == "train":
            self.record_modality_outputs(features, targets)
            per_modality = self.modality_logits
        else:
            per_modality = self.modality_outputs(features)
        if not self._loggable(objective, split):
            return objective  # the run's policy skips (or warns about) this step: its values are not logged
        for name, aux_loss in aux_losses.items():
            self._log_loss(split, f"{name}/aux_loss", aux_loss, batch_size)
        self._log_loss(split, "loss", loss, batch_size, on_step=split == "train", prog_bar=True)
        self._update_metrics(split, FUSED, logits.detach(), targets)
        for name, modality_logits in per_modality.items():
            modality_loss = self.compute_modality_loss(name, modality_logits.detach(), targets)
            self._log_loss(split, f"{name}/loss", modality_loss, batch_size)
            self._update_metrics(split, name, modality_logits.detach(), targets)
        return objective

    def _loggable(self, objective: Tensor, split: str) -> bool:
        """Whether the step's values are logged: ``False`` on every DDP rank at once (the training loss is logged with
        ``sync_dist``, a collective) for a non-finite training objective that the run's
        :func:`~ml_optim_plugins.nonfinite.nonfinite_policy` skips or warns about; any other non-finite objective raises."""
        try:
            trainer = self.trainer
        except RuntimeError:  # not attached to a Trainer
            trainer = None
        finite = torch.isfinite(objective.detach())
        if split == "train" and nonfinite_policy(trainer) != "raise":
            if trainer is not None and trainer.world_size > 1:
                finite = trainer.strategy.reduce((~finite).float(), reduce_op="sum") == 0
            return bool(finite)
        if bool(finite):
            return True
        advice = (
            "; or attach GradientMonitor(on_nonfinite='skip_step') to skip such steps" if split == "train" else ""
        )
        raise FloatingPointError(
            f"{split} loss is {objective.item()} at global step {self.global_step}; lower the learning rate, check the "
            f"inputs for NaN/Inf, or add gradient clipping{advice}"
        )

    def _log_loss(
        self, split: str, name: str, value: Tensor, batch_size: int, on_step: bool = False, prog_bar: bool = False
    ) -> None:
        key = metric_key(split, name)
        if split == "train":
            # Every rank's training batches have the same size (the distributed sampler pads the training split), so
            # Lightning's sync_dist, a mean over the ranks, gives the global batch's mean per step; the epoch's mean is
            # a MeanMetric (summed over ranks), kept in checkpoints.
            if on_step:
                self.log(f"{key}_step", value, on_step=True, on_epoch=False, prog_bar=prog_bar, sync_dist=True)
            self.train_losses[key].update(value.detach().expand(batch_size))
            self.log(key, self.train_losses[key], on_step=False, on_epoch=True)
            return
        # Evaluation shards differ by up to one sample (unpadded). sync_dist would divide by a floored integer mean of
        # the counts (Lightning-AI/pytorch-lightning#21859); a MeanMetric sums values and counts over the ranks. The
        # batch mean goes in once per sample, not as weight=: nan_strategy="disable" (a NaN loss is logged as NaN)
        # drops weights in torchmetrics 1.9 (Lightning-AI/torchmetrics#3434).
        metric = self.eval_losses[key]
        if metric.update_count == 0:
            # Fresh states in this loop's grad mode: MeanMetric adds in place, and states reset at the end of a
            # trainer.validate (inference mode) cannot be updated in fit's validation (no_grad).
            metric.reset()
        metric.update(value.detach().expand(batch_size))
        self.log(key, metric, on_step=False, on_epoch=True, prog_bar=prog_bar)

    def _update_metrics(self, split: str, head: str, logits: Tensor, targets: Tensor) -> None:
        collection = self.metrics[f"{split}_{head}"]
        collection.update(logits, targets)
        self.log_dict(collection, on_step=False, on_epoch=True, prog_bar=head == FUSED and split != "train")

    def setup(self, stage: str) -> None:
        """Under DDP, before ``fit``: :func:`~ml_optim_plugins.rank_seed.seed_per_rank`, so each rank draws its own dropout
        noise (docs/compatibility.md). Call ``super().setup(stage)`` when overriding."""
        if stage == "fit" and self.trainer.world_size > 1:
            seed_per_rank(self.trainer.global_rank)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """At an epoch's first batch, start the epoch's running losses and metrics afresh. Lightning resets them after
        the epoch-end logging, but a checkpoint saved at an epoch's end holds them unreset: a run resumed from it
        would otherwise count the previous epoch into the next one."""
        if batch_idx == 0:
            for module in self._training_epoch_states():
                module.reset()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Under DDP, every process's running training states go into the checkpoint, so each rank of a run resumed
        mid-epoch continues its own. Call ``super().on_save_checkpoint(checkpoint)`` when overriding."""
        save_rank_states(self, self._training_epoch_states(), checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Each process takes back its own running training states. Call ``super()`` when overriding."""
        load_rank_states(self, checkpoint)

    def _training_epoch_states(self) -> list[nn.Module]:
        """The training epoch's running losses and metric collections (kept in checkpoints, reset per epoch)."""
        return [m for name, m in [*self.train_losses.items(), *self.metrics.items()] if name.startswith("train")]

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        return self.step(batch, "train")

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        return self.step(batch, "val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        return self.step(batch, "test")

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Class probabilities (``probs``) and predicted class ids (``preds``) of the fused model, each modality's own
        probabilities (``modality_probs``: ``{modality: (batch, classes)}``), and the samples' positions in their
        split (``index``, where the batch has them), which :class:`~ml_optim_plugins.PredictionWriter` orders by."""
        features = self.compute_features(batch)
        probs = self.fusion(features).softmax(dim=-1)
        outputs: dict[str, Any] = {
            "probs": probs,
            "preds": probs.argmax(dim=-1),
            "modality_probs": {name: logits.softmax(dim=-1) for name, logits in self.modality_outputs(features).items()},
        }
        if self.sample_id_key in batch:
            outputs["index"] = batch[self.sample_id_key]
        return outputs

    def param_groups(self) -> list[dict[str, Any]]:
        """One named param group per modality encoder (``encoders.<modality>``) and one for the rest (``fusion``):
        readable ``LearningRateMonitor`` keys, and per-encoder LR multipliers without splitting groups."""
        groups = [
            {"name": f"encoders.{name}", "params": list(encoder.parameters())}
            for name, encoder in self.encoders.items()
        ]
        in_encoders = {id(p) for group in groups for p in group["params"]}
        rest = [p for p in self.parameters() if id(p) not in in_encoders]
        if rest:
            groups.append({"name": "fusion", "params": rest})
        return [group for group in groups if group["params"]]

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            optimizer = torch.optim.AdamW(self.param_groups(), lr=1e-3, weight_decay=0.01)
        else:
            optimizer = self.optimizer_factory(self.param_groups())
        check_learning_rates(optimizer)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval}}
