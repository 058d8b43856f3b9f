"""Modality dropout: drop a whole modality's features per sample, never every modality of a sample."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ml_optim_plugins.hyperparameters import check_number, check_rate


def modality_keep_mask(
    batch_size: int, rates: Mapping[str, float], generator: torch.Generator | None = None, device: torch.device | None = None
) -> dict[str, Tensor]:
    """Draw which modalities each sample keeps: ``{modality: bool tensor (batch_size,)}``.

    Each modality is dropped independently with its rate; a sample that would lose every modality keeps one, chosen
    uniformly, so no sample is left without input.

    Example:
        >>> masks = modality_keep_mask(1000, {"image": 0.9, "text": 0.9}, torch.Generator().manual_seed(0))
        >>> bool((masks["image"] | masks["text"]).all())
        True
    """
    names = list(rates)
    uniform = torch.rand(len(names), batch_size, generator=generator, device=device)
    drop_rates = torch.tensor([rates[n] for n in names], device=device).unsqueeze(1)
    keep = uniform >= drop_rates
    lost_all = ~keep.any(0)
    if lost_all.any():
        rescued = torch.randint(len(names), (batch_size,), generator=generator, device=device)
        keep[rescued, torch.arange(batch_size, device=device)] |= lost_all
    return {name: keep[i] for i, name in enumerate(names)}


def keep_probabilities(rates: Mapping[str, float]) -> dict[str, float]:
    """Probability that each modality is kept under :func:`modality_keep_mask`: ``(1 - p_m) + prod(p) / M``."""
    all_dropped = math.prod(rates.values())
    return {name: (1.0 - p) + all_dropped / len(rates) for name, p in rates.items()}


class ModalityDropout(nn.Module):
    """Drop whole modalities per sample in training, so the fusion cannot rely on one modality alone.

    Takes and returns the features dict of the modality contract (``{modality: (batch, ...)}``). In training each
    sample loses each modality with probability ``p`` (per modality if a mapping), never all of them; a dropped
    modality's features are replaced by zeros (or ``fill``), and kept features are divided by their probability of
    being kept, so each modality's expected contribution is unchanged (as in inverted dropout). Identity in eval.

    ``MultimodalClassifier(modality_dropout=ModalityDropout(0.3))`` applies it to the features before the fusion
    (the per-modality predictions read by callbacks still see every modality).

    Args:
        p: drop rate of every modality, or ``{modality: rate}``; each in [0, 1).
        rescale: divide kept features by their keep probability.
        fill: value of a dropped modality's features.

    Raises:
        ValueError: a rate outside [0, 1), or (at forward) a mapping of rates that names modalities the features lack.

    Example:
        >>> dropout = ModalityDropout({"image": 0.5, "text": 0.2})
        >>> out = dropout({"image": torch.ones(6, 4), "text": torch.ones(6, 3)})
        >>> sorted(out), out["image"].shape
        (['image', 'text'], torch.Size([6, 4]))
    """

    def __init__(self, p: float | Mapping[str, float] = 0.3, rescale: bool = True, fill: float = 0.0) -> None:
        super().__init__()
        if isinstance(p, Mapping):
            self.p: float | dict[str, float] = {name: check_rate(rate, f"p[{name!r}]") for name, rate in p.items()}
        else:
            self.p = check_rate(p)
        self.rescale, self.fill = rescale, check_number("fill", fill)

    def rates(self, modalities: list[str]) -> dict[str, float]:
        """The drop rate of each of ``modalities``."""
        if not isinstance(self.p, dict):
            return dict.fromkeys(modalities, self.p)
        unknown = sorted(set(self.p) - set(modalities))
        if unknown:
            raise ValueError(f"ModalityDropout rates name {unknown}, but the features have {sorted(modalities)}")
        return {name: self.p.get(name, 0.0) for name in modalities}

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if not self.training or len(features) < 2:
            return dict(features)
        rates = self.rates(list(features))
        first = next(iter(features.values()))
        keep = modality_keep_mask(first.shape[0], rates, device=first.device)
        probability = keep_probabilities(rates)
        out = {}
        for name, x in features.items():
            mask = keep[name].view(-1, *([1] * (x.dim() - 1)))
            kept = x / probability[name] if self.rescale else x
            out[name] = torch.where(mask, kept, torch.full_like(x, self.fill))
        return out

    def extra_repr(self) -> str:
        return f"p={self.p}, rescale={self.rescale}"
