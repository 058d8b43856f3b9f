"""Elastic-net penalty: value, which parameters, and the callback equal to adding the penalty to the loss, with
gradient accumulation; errors at setup; 2-process DDP keeps ranks identical."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ml_optim_plugins import ElasticNetPenalty
from ml_optim_plugins.functional import elastic_net_penalty
from ml_optim_plugins.regularization import regularized_parameters
from tests.regularization.tiny_modules import Regression


@pytest.mark.parametrize("l1, l2", [(0.1, 0.0), (0.0, 0.3), (0.05, 0.2)])
def test_penalty_value_is_l1_plus_l2(l1, l2):
    weights = [torch.tensor([1.0, -2.0, 0.5]), torch.tensor([[3.0], [-0.25]])]
    expected = l1 * (3.5 + 3.25) + l2 * (1 + 4 + 0.25 + 9 + 0.0625)
    assert elastic_net_penalty(weights, l1, l2).item() == pytest.approx(expected)


def test_negative_weights_are_rejected():
    with pytest.raises(ValueError, match="l1 must be a finite number >= 0"):
        elastic_net_penalty([torch.ones(1)], l1=-1.0)
    with pytest.raises(ValueError, match="not both 0"):
        ElasticNetPenalty()


def test_biases_and_normalisation_weights_are_left_out_by_default():
    model = Regression()
    assert sorted(regularized_parameters(model)) == ["body.weight", "head.weight"]
    assert sorted(regularized_parameters(model, exclude_bias_and_norm=False)) == [
        "body.bias", "body.weight", "head.bias", "head.weight", "norm.bias", "norm.weight",
    ]
    assert sorted(regularized_parameters(model, modules=["h*"])) == ["head.weight"]
    with pytest.raises(ValueError, match=r"modules entry 'encoder' matches no submodule; top-level modules are \['body', 'head', 'norm'\]"):
        regularized_parameters(model, modules=["encoder"])


@pytest.mark.parametrize("accumulate", [1, 2])
def test_callback_equals_adding_the_penalty_to_the_loss(make_penalty_trainer, accumulate):
    l1, l2, steps = 0.01, 0.05, 4
    trained = Regression()
    trainer = make_penalty_trainer(
        callbacks=[ElasticNetPenalty(l1=l1, l2=l2)], max_steps=steps, accumulate_grad_batches=accumulate
    )
    trainer.fit(trained)

    manual = Regression()
    optimizer = torch.optim.SGD(manual.parameters(), lr=manual.lr)
    batches = iter(manual.train_dataloader())
    for _ in range(steps):
        optimizer.zero_grad()
        for _ in range(accumulate):
            x, y = next(batches)
            (manual.data_loss(x, y) / accumulate).backward()
        elastic_net_penalty([manual.body.weight, manual.head.weight], l1, l2).backward()
        optimizer.step()
    for (name, a), b in zip(trained.named_parameters(), manual.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
    penalty = elastic_net_penalty([trained.body.weight, trained.head.weight], l1, l2).item()
    assert trainer.logged_metrics["train/elastic_net"].item() == pytest.approx(penalty, rel=0.05)


def test_frozen_parameters_are_skipped(make_penalty_trainer):
    model = Regression()
    model.body.requires_grad_(False)
    before = model.body.weight.detach().clone()
    make_penalty_trainer(callbacks=[ElasticNetPenalty(l1=0.1)], max_steps=2).fit(model)
    assert torch.equal(model.body.weight, before) and model.body.weight.grad is None


def test_unknown_module_fails_at_setup(make_penalty_trainer):
    trainer = make_penalty_trainer(callbacks=[ElasticNetPenalty(l2=0.1, modules=["fusion"])], max_steps=2)
    with pytest.raises(ValueError, match="modules entry 'fusion' matches no submodule"):
        trainer.fit(Regression())
    assert trainer.global_step == 0


def test_two_process_ddp_ranks_stay_identical(run_ddp_ranks, tmp_path):
    run_ddp_ranks(str(Path(__file__).with_name("ddp_penalty.py")), str(tmp_path))
    rank0, rank1 = (json.loads((tmp_path / f"params-rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1 and rank0["steps"] == 4


def test_variational_noise_parameters_and_tied_weights():
    from ml_optim_plugins import VariationalGaussianDropout
    from ml_optim_plugins.regularization import VariationalLinear

    model = torch.nn.Sequential(VariationalLinear(4, 4), VariationalGaussianDropout(4))
    assert list(regularized_parameters(model)) == ["0.weight"]
    embedding, out = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False)
    out.weight = embedding.weight
    tied = torch.nn.ModuleDict({"emb": embedding, "out": out})
    assert list(regularized_parameters(tied)) == ["emb.weight"]


def test_modules_built_in_configure_model_are_penalised(make_penalty_trainer):
    class Late(Regression):
        def __init__(self):
            super().__init__()
            self.extra = None

        def configure_model(self):
            if self.extra is None:
                self.extra = torch.nn.Linear(2, 2)

    callback = ElasticNetPenalty(l2=0.1, modules=["extra"])
    make_penalty_trainer(callbacks=[callback], max_steps=1).fit(Late())
    assert len(callback._params) == 1


def test_norm_types_hold_every_batch_and_instance_norm_of_torch():
    """NORM_TYPES lists torch.nn's norm classes by their public names: every public class built on torch's private
    ``_NormBase`` (torch 2.14: 13) must be among them, so a norm torch adds is not penalised unnoticed."""
    import inspect

    from torch import nn

    from ml_optim_plugins.regularization.elastic_net import NORM_TYPES

    norm_base = nn.modules.batchnorm._NormBase
    public = {cls for cls in vars(nn).values() if inspect.isclass(cls) and issubclass(cls, norm_base)}
    assert len(public) >= 13 and public <= set(NORM_TYPES), sorted(cls.__name__ for cls in public - set(NORM_TYPES))
