"""check_gradients: planted bugs are detected and named, correct models pass over seeds, kinks are not failures,
the original module and RNG are untouched, the report's aggregates and output."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from ml_optim_plugins import check_gradients
from ml_optim_plugins.gradcheck import GradCheckReport
from tests.gradcheck.planted import (
    BUGS,
    Everything,
    WithCustomLayer,
    classification_loss,
    everything_batch,
    everything_loss,
)


def custom_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(10, 6, generator=g), torch.randint(0, 3, (10,), generator=g)


# planted bug -> the tensors that must fail (a wrong input-gradient shows in the parameters before the layer)
EXPECTED_FAILURES = {
    "scaled": {"encoder.weight", "encoder.bias"},
    "sign": {"custom.w"},
    "missing_term": {"encoder.weight", "encoder.bias"},
    "one_element": {"custom.w"},
}


@pytest.mark.parametrize("bug", [b for b in BUGS if b != "none"])
def test_planted_bugs_are_detected_and_named(bug):
    torch.manual_seed(0)
    report = check_gradients(WithCustomLayer(bug), custom_batch(), classification_loss)
    assert not report.passed
    assert {t.name for t in report.failed} == EXPECTED_FAILURES[bug]
    assert report.worst_modules()[0] in {"encoder", "custom"}
    assert "FAILED" in str(report) and "worst modules" in str(report)


def test_single_wrong_element_is_located():
    torch.manual_seed(0)
    report = check_gradients(WithCustomLayer("one_element"), custom_batch(), classification_loss)
    (failed,) = report.failed
    assert failed.mode == "elements" and failed.worst[0]["index"] == 3
    assert failed.worst[0]["analytical"] == pytest.approx(1.5 * failed.worst[0]["numerical"], rel=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_correct_models_with_dropout_batchnorm_layernorm_embeddings_attention_pass(seed, mode):
    torch.manual_seed(seed)
    report = check_gradients(Everything(), everything_batch(seed), everything_loss, mode=mode, inputs=True, directions=2)
    assert report.passed, str(report)
    names = {t.name for t in report.tensors}
    assert {"embedding.weight", "attention.self_attn.in_proj_weight", "conv.1.weight", "input.image"} <= names
    assert all(t.max_rel_error < 1e-4 for t in report.tensors if t.status == "passed")


def test_correct_custom_layer_passes_over_seeds():
    for seed in range(3):
        torch.manual_seed(seed)
        assert check_gradients(WithCustomLayer("none"), custom_batch(seed), classification_loss).passed


def test_a_kink_exactly_at_the_point_is_nondifferentiable_not_failed():
    w = torch.nn.Parameter(torch.tensor([0.0, 1.0, -1.0, 0.5]))
    module = torch.nn.Module()
    module.w = w
    report = check_gradients(module, None, lambda m, _: torch.relu(m.w).sum() + m.w.pow(2).sum())
    (tensor,) = report.tensors
    assert tensor.status == "nondifferentiable" and report.passed and report.nondifferentiable == [tensor]
    assert "non-differentiable" in str(report)


def test_max_ties_are_not_failures():
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(torch.tensor([2.0, 2.0, 1.0]))
    assert check_gradients(module, None, lambda m, _: m.w.max() * 3).passed


def test_original_module_optimizer_and_rng_are_untouched():
    torch.manual_seed(0)
    model = Everything().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    check_gradients(model, everything_batch(0), everything_loss)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN running stats too
    assert all(p.grad is None for p in model.parameters()) and next(model.parameters()).dtype == torch.float32


def test_lightning_module_training_step_is_the_default_loss():
    report = check_gradients(BoringModel(), torch.randn(4, 32))
    assert report.passed and [t.name for t in report.tensors] == ["layer.weight", "layer.bias"]


def test_multimodal_classifier_groups_by_modality(tiny_model, tiny_datamodule):
    tiny_datamodule.setup("fit")
    batch = next(iter(tiny_datamodule.train_dataloader()))
    params = ["encoders.image.model.layer4.0.downsample*", "encoders.text.*.layer.5.output.dense", "fusion"]
    report = check_gradients(tiny_model, batch, max_samples=2, params=params, mode="eval")
    assert report.passed, str(report)
    modalities = report.by_modality()
    assert set(modalities) == {"image", "text", "shared"} and modalities["text"]["tensors"] == 2
    assert all(t.modality is None for t in report.tensors if t.name.startswith("fusion"))
    assert report.by_module(depth=2).keys() == {"encoders.image", "encoders.text", "fusion.head"}


def test_params_filter_and_report_serialisation():
    torch.manual_seed(0)
    report = check_gradients(WithCustomLayer("sign"), custom_batch(), classification_loss, params=["custom"])
    assert [t.name for t in report.tensors] == ["custom.w"] and not report.passed
    data = json.loads(json.dumps(report.to_dict()))
    assert data["passed"] is False and data["tensors"][0]["status"] == "failed"
    assert data["by_modality"]["shared"]["failed"] == 1
    assert report.by_module() == {"custom": {"tensors": 1, "failed": 1, "nondifferentiable": 0,
                                             "max_rel_error": report.tensors[0].max_rel_error, "passed": False}}
    with pytest.raises(ValueError, match="selects no trainable parameter"):
        check_gradients(WithCustomLayer(), custom_batch(), classification_loss, params=["nothing"])


@pytest.mark.parametrize("kwargs, message", [({"mode": "test"}, "mode='test'"), ({"eps": 0}, "eps must be a finite number > 0, got 0")])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_gradients(WithCustomLayer(), custom_batch(), classification_loss, **kwargs)


def test_module_without_training_step_needs_a_loss_fn():
    with pytest.raises(TypeError, match="has no training_step; pass loss_fn"):
        check_gradients(torch.nn.Linear(2, 2), torch.randn(3, 2))


def test_empty_report_renders():
    report = GradCheckReport([], 1e-6, 1e-4, 1e-8, 0.0, 0.0, 0)
    assert report.passed and "PASSED" in str(report)


def test_the_float64_copy_shares_factories_and_rebinds_methods():
    """What LightningCLI and DDP leave on a module: a factory whose closure reaches objects that cannot be deep-copied
    (the CLI, its Trainer, the DDP wrapper), and Lightning's forward redirection's bound ``forward`` in the instance
    dict. The copy shares the first, binds the second to itself, and the original is left as it was."""
    import functools

    from ml_optim_plugins.module_copy import detached_copy

    class NotCopyable:
        def __deepcopy__(self, memo):
            raise RuntimeError("deep-copied a DDP wrapper")

    model = BoringModel()
    model.optimizer_factory = functools.partial(torch.optim.SGD, lr=0.1, foreach=NotCopyable())
    model.forward = model.forward  # as _ForwardRedirection leaves it after a step
    clone = detached_copy(model, torch.float64)
    assert clone.optimizer_factory is model.optimizer_factory
    assert vars(clone)["forward"].__self__ is clone and clone.layer.weight.dtype == torch.float64
    assert vars(model)["forward"].__self__ is model and model.layer.weight.dtype == torch.float32
    batch = torch.randn(2, 32)
    assert torch.allclose(clone(batch.double()).float(), model(batch), atol=1e-6)


def test_the_copy_of_a_module_in_a_trainer_has_no_trainer():
    """detached_copy clears the copy's Trainer and Fabric through LightningModule's public setters, for the copy and
    the LightningModules inside it; the original keeps its Trainer."""
    import lightning.pytorch as pl

    from ml_optim_plugins.module_copy import detached_copy

    model = BoringModel()
    model.inner = BoringModel()
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    model.trainer = trainer
    clone = detached_copy(model)
    for module in (clone, clone.inner):
        with pytest.raises(RuntimeError, match="not attached to a `Trainer`"):
            module.trainer
        assert module.fabric is None
    assert model.trainer is trainer and model.inner.trainer is trainer
