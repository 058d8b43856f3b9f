"""A fit as 2 nodes x 1 process on this machine: ``Trainer(num_nodes=2, devices=1, strategy="ddp")`` in two processes
started here, each with the environment a cluster launcher gives it (Lightning's own variables, torchrun's, or srun's),
gloo on localhost. Lightning must detect the launcher, place each process on its node, and the ranks must end with the
same weights and log the same (global) metrics."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest

from tests.launcher import run_ranks

SCRIPT = str(Path(__file__).parent / "multimodal" / "ddp_evaluation.py")


def launcher_environment(launcher: str, node: int, port: int) -> dict[str, str]:
    """What each launcher sets for the one process of node ``node`` (of 2), the main node at 127.0.0.1:``port``."""
    main = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    if launcher == "lightning":  # a launcher of your own: Lightning's LightningEnvironment reads these
        return {**main, "NODE_RANK": str(node), "LOCAL_RANK": "0", "WORLD_SIZE": "2"}
    if launcher == "torchrun":  # torchrun --nnodes 2 --nproc-per-node 1 --node-rank N (TorchElasticEnvironment)
        return {**main, "RANK": str(node), "GROUP_RANK": str(node), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "test"}
    # srun under sbatch --nodes 2 --ntasks-per-node 1 (SLURMEnvironment); the address as an sbatch script exports it
    return {**main, "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "2", "SLURM_PROCID": str(node),
            "SLURM_LOCALID": "0", "SLURM_NODEID": str(node), "SLURM_JOB_NAME": "multimodal", "SLURM_JOB_ID": "4242",
            "SLURM_NODELIST": "127.0.0.1"}


@pytest.mark.parametrize(
    ("launcher", "environment"),
    [("lightning", "LightningEnvironment"), ("torchrun", "TorchElasticEnvironment"), ("slurm", "SLURMEnvironment")],
)
def test_two_nodes_of_one_process_agree(tmp_path, launcher, environment):
    run_ranks([SCRIPT, str(tmp_path), "metrics", "1", "2"], tmp_path, partial(launcher_environment, launcher))
    rank0, rank1 = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1))
    for rank, result in enumerate((rank0, rank1)):
        assert result["environment"] == environment
        assert (result["global_rank"], result["node_rank"], result["local_rank"]) == (rank, rank, 0)
        assert (result["world_size"], result["num_nodes"]) == (2, 2)
    for key in ("validations", "after_fit", "test", "weights"):
        assert rank0[key] == rank1[key], key
    assert len(rank0["validations"]) == 2 and {"val/loss", "val/acc", "val/f1"} <= set(rank0["after_fit"])
    assert rank0["validations"][0]["val/loss"] != rank0["validations"][1]["val/loss"]  # it trained between them
