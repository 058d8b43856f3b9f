"""Ending a distributed run: destroy torch.distributed's default process group while Python is fully alive."""

from __future__ import annotations

import torch.distributed as dist


def destroy_default_process_group() -> bool:
    """Destroy torch.distributed's default process group, if one is initialized, and say whether there was one.

    Call it once per process after the last ``trainer.fit`` / ``validate`` / ``test`` of a script run with
    ``strategy="ddp"`` (the ``ml-optim-plugins`` command does). Lightning's ``DDPStrategy`` creates the group and never
    destroys it outside NCCL; a gloo group left to interpreter shutdown keeps its worker threads, which may still hold
    the tensors of the last collective and then take the GIL of a finalizing interpreter: the process aborts with
    "terminate called without an active exception" (SIGABRT) after a successful run (pytorch/pytorch#190489).
    Destroying the group joins those threads first. Call it on success only: after an error a peer may be blocked in a
    collective, and the group's destructor would wait for it.

    Returns:
        ``True`` if a group was destroyed, ``False`` if none was initialized (a single-process run, or already done).

    Example:
        >>> trainer.fit(model, datamodule=data)  # doctest: +SKIP
        >>> trainer.test(model, datamodule=data)  # doctest: +SKIP
        >>> destroy_default_process_group()  # doctest: +SKIP
        True
    """
    if not (dist.is_available() and dist.is_initialized()):
        return False
    dist.destroy_process_group()
    return True
