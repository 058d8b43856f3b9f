"""Seeding each distributed process's noise on its own: the run's seed offset by the process's global rank."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

SEED_ENV = "PL_GLOBAL_SEED"  # set by Lightning's seed_everything in every process it starts


def run_seed() -> int:
    """The run's seed: the one ``seed_everything`` set (``PL_GLOBAL_SEED``, the same in every process it seeded), else
    torch's initial seed (random per process when nothing seeded it: under DDP the data modules then take rank 0's).
    Unlike ``torch.initial_seed()``, unchanged by :func:`seed_per_rank`.

    Example:
        >>> _ = torch.manual_seed(3)
        >>> run_seed() == int(os.environ.get("PL_GLOBAL_SEED", 3))
        True
    """
    return int(os.environ.get(SEED_ENV, torch.initial_seed()))


def seed_per_rank(global_rank: int, seed: int | None = None) -> int:
    """Seed torch's, numpy's and Python's global RNGs with ``seed + global_rank`` and return that seed.

    Lightning's ``seed_everything`` gives every DDP process the same seed, so each rank would draw the same dropout
    noise for different samples. Call it once per process after the model is built and before training draws
    anything (:class:`MultimodalClassifier` does, in ``setup``, when the Trainer has several processes); the same seed
    and rank give the same stream, and ``PL_GLOBAL_SEED`` (the sampler's shuffle) is left unchanged.
    docs/compatibility.md has the details.

    Args:
        global_rank: the process's rank among all processes (``trainer.global_rank``), >= 0.
        seed: the run's seed; ``None``: the seed ``seed_everything`` set (``PL_GLOBAL_SEED``), else torch's initial
            seed, which is the same in every process that never seeded.

    Returns:
        The seed used, ``(seed + global_rank) mod 2**32`` (numpy's range).

    Raises:
        ValueError: ``global_rank`` is negative.

    Example:
        >>> seed_per_rank(1, seed=7)
        8
        >>> first = torch.rand(2)
        >>> _ = seed_per_rank(1, seed=7)
        >>> torch.equal(torch.rand(2), first)
        True
    """
    if global_rank < 0:
        raise ValueError(f"global_rank={global_rank} must be >= 0 (trainer.global_rank)")
    if seed is None:
        seed = run_seed()
    rank_seed = (int(seed) + global_rank) % 2**32
    torch.manual_seed(rank_seed)  # every device's generator too
    np.random.seed(rank_seed)
    random.seed(rank_seed)
    return rank_seed
