"""seed_per_rank: the run's seed plus the rank seeds torch, numpy and random; the same seed and rank repeat the
stream, another rank draws another; without a seed it takes seed_everything's."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ml_optim_plugins.rank_seed import seed_per_rank


@pytest.fixture(autouse=True)
def restored_rngs():
    """The global RNG states as they were, for the tests that run after these."""
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    yield
    torch.set_rng_state(states[0]), np.random.set_state(states[1]), random.setstate(states[2])


def draws() -> tuple:
    return torch.rand(4).tolist(), np.random.rand(4).tolist(), [random.random() for _ in range(4)]


def test_same_seed_and_rank_repeat_every_stream_another_rank_differs():
    assert seed_per_rank(1, seed=10) == 11
    first = draws()
    seed_per_rank(1, seed=10)
    assert draws() == first
    seed_per_rank(0, seed=10)
    other = draws()
    assert all(a != b for a, b in zip(first, other))
    assert seed_per_rank(0, seed=11) == 11 and draws() == first  # only seed + rank matters


def test_without_a_seed_it_offsets_the_run_seed(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "5")  # what seed_everything(5) sets in every process
    assert seed_per_rank(2) == 7
    monkeypatch.delenv("PL_GLOBAL_SEED")
    torch.manual_seed(3)  # no seed_everything: torch's own seed
    assert seed_per_rank(1) == 4
    assert seed_per_rank(3, seed=2**32 - 1) == 2  # kept in numpy's range


def test_a_negative_rank_is_refused():
    with pytest.raises(ValueError, match=r"global_rank=-1 must be >= 0"):
        seed_per_rank(-1)
