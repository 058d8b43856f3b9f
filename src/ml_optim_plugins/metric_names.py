"""The names of the metrics the library logs and reads back, written and parsed in one place, so the run report (and
a user's dashboards) read exactly what the callbacks and the classifier log.

- ``{split}/{metric}`` and ``{split}/{modality}/{metric}``: :class:`~ml_optim_plugins.MultimodalClassifier`'s losses
  and torchmetrics per split (``train``, ``val``, ``test``), fused and per modality; Lightning may add ``_step`` /
  ``_epoch`` to a key logged both ways.
- ``balance/{modality}/{statistic}``: :class:`~ml_optim_plugins.ModalityBalancer`'s per-step statistics.
- ``gradcheck/passed``, ``gradcheck/failed_tensors``, ``gradcheck/max_rel_error/{modality}``:
  :class:`~ml_optim_plugins.GradientCheck`.
- ``finetuning/stage``: the stage :class:`~ml_optim_plugins.StagedFinetuning` entered.
"""

from __future__ import annotations

from typing import NamedTuple

SPLITS = ("train", "val", "test")
BALANCE = "balance"
GRADCHECK_PASSED = "gradcheck/passed"
GRADCHECK_FAILED_TENSORS = "gradcheck/failed_tensors"
FINETUNING_STAGE = "finetuning/stage"


class SplitMetric(NamedTuple):
    """A parsed ``{split}/[{modality}/]{metric}`` key: ``modality`` is ``None`` for the fused prediction."""

    split: str
    modality: str | None
    metric: str


def metric_key(split: str, metric: str, modality: str | None = None) -> str:
    """The key of ``metric`` on ``split``, of the fused prediction (``modality=None``) or of one modality.

    Example:
        >>> metric_key("val", "f1"), metric_key("test", "acc", "image")
        ('val/f1', 'test/image/acc')
    """
    return f"{metric_prefix(split, modality)}{metric}"


def metric_prefix(split: str, modality: str | None = None) -> str:
    """What every key of ``split`` (and ``modality``) starts with, e.g. a torchmetrics collection's ``prefix``.

    Example:
        >>> metric_prefix("val"), metric_prefix("val", "text")
        ('val/', 'val/text/')
    """
    return f"{split}/" if modality is None else f"{split}/{modality}/"


def parse_metric_key(key: str) -> SplitMetric | None:
    """``key`` split into (split, modality, metric), with Lightning's ``_epoch`` suffix removed; ``None`` for a key
    that is not a split's metric.

    Example:
        >>> parse_metric_key("val/image/acc_epoch"), parse_metric_key("val/f1")
        (SplitMetric(split='val', modality='image', metric='acc'), SplitMetric(split='val', modality=None, metric='f1'))
        >>> parse_metric_key("balance/image/score") is None
        True
    """
    parts = key.removesuffix("_epoch").split("/")
    if parts[0] not in SPLITS or len(parts) not in (2, 3) or not all(parts):
        return None
    return SplitMetric(parts[0], parts[1] if len(parts) == 3 else None, parts[-1])


def balance_key(modality: str, statistic: str) -> str:
    """The key of a balancing statistic of ``modality``.

    Example:
        >>> balance_key("image", "coefficient")
        'balance/image/coefficient'
    """
    return f"{BALANCE}/{modality}/{statistic}"


def parse_balance_key(key: str) -> tuple[str, str] | None:
    """``(modality, statistic)`` of a balancing key; ``None`` for any other key.

    Example:
        >>> parse_balance_key("balance/text/ratio"), parse_balance_key("val/text/acc")
        (('text', 'ratio'), None)
    """
    parts = key.split("/")
    if len(parts) != 3 or parts[0] != BALANCE or not all(parts):
        return None
    return parts[1], parts[2]


def gradcheck_error_key(modality: str) -> str:
    """The key of the gradient check's largest relative error among ``modality``'s tensors.

    Example:
        >>> gradcheck_error_key("image")
        'gradcheck/max_rel_error/image'
    """
    return f"gradcheck/max_rel_error/{modality}"
