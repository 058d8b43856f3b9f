"""destroy_default_process_group: a gloo group and its native threads are gone afterwards; a second call, or a run
without a group, is a no-op."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ml_optim_plugins.process_group import destroy_default_process_group
from tests.conftest import gloo_threads


def test_destroys_a_gloo_group_and_joins_its_threads():
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    dist.all_reduce(torch.ones(3))
    assert gloo_threads(), "a gloo group should run worker threads; the thread names may have changed"
    assert destroy_default_process_group() is True
    assert not dist.is_initialized()
    assert gloo_threads() == []
    assert destroy_default_process_group() is False


def test_without_a_group_it_does_nothing():
    assert not dist.is_initialized()
    assert destroy_default_process_group() is False
