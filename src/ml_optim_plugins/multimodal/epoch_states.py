"""Each DDP process's running training-epoch states (loss means, metric counts) kept in checkpoints.

A checkpoint is written by rank 0 alone, so its ``state_dict`` holds rank 0's running states only; loaded as they are,
every rank of a run resumed mid-epoch would count rank 0's earlier batches, and the epoch's figures would be wrong.
:func:`save_rank_states` adds every rank's states to the checkpoint (gathered, one row per rank) and
:func:`load_rank_states` gives each rank back its own before Lightning loads the ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

RANK_STATES_KEY = "training_epoch_states_per_rank"


def _states(module: pl.LightningModule, owners: Iterable[nn.Module]) -> dict[str, Tensor]:
    owners = {id(owner) for owner in owners}
    states: dict[str, Tensor] = {}
    for name, child in module.named_modules():
        if id(child) in owners:
            states.update(child.state_dict(prefix=f"{name}."))
    return states


def save_rank_states(module: pl.LightningModule, owners: Iterable[nn.Module], checkpoint: dict[str, Any]) -> None:
    """Under DDP, store every process's ``owners`` states in ``checkpoint`` (a collective: call it on every rank,
    as Lightning calls ``on_save_checkpoint``). One process: nothing to add."""
    if module.trainer.world_size < 2:
        return
    gathered = module.all_gather(_states(module, owners))  # {key: (world_size, *shape)}
    checkpoint[RANK_STATES_KEY] = {key: value.cpu() for key, value in gathered.items()}


def load_rank_states(module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
    """Put this process's own saved states into ``checkpoint["state_dict"]`` before Lightning loads it. Resumed with
    another number of processes, the states cannot be split again: every rank keeps rank 0's and a warning says the
    resumed epoch's training figures are off."""
    saved = checkpoint.get(RANK_STATES_KEY)
    if not saved:
        return
    world_size, rank = module.trainer.world_size, module.trainer.global_rank
    saved_size = next(iter(saved.values())).shape[0]
    if saved_size != world_size:
        if module.trainer.state.fn == TrainerFn.FITTING:
            rank_zero_warn(
                f"the checkpoint holds the running training states of {saved_size} processes and this run has "
                f"{world_size}: the resumed epoch's train/* figures count rank 0's batches before the checkpoint "
                "only; resume with the same number of processes for the exact figures"
            )
        return
    checkpoint["state_dict"].update({key: value[rank] for key, value in saved.items()})
