"""Every stateful callback resumes exactly: a run stopped at an epoch boundary and resumed from its checkpoint ends with
the same callback state and the same weights as a run that never stopped (data in a fixed order: Lightning does not
restore a shuffling sampler's random state)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from ml_optim_plugins import (
    CurvatureProbe,
    GradientCheck,
    GradientMonitor,
    TrainingCurves,
    VariationalKL,
    WarmupDecay,
)
from tests.gradcheck.planted import CustomLightning
from tests.regularization.tiny_modules import Regression

Ordered = partial(CustomLightning, shuffle=False)

CASES = {
    "GradientCheck": (lambda: GradientCheck(every_n_epochs=2, on_failure="warn"), Ordered),
    "GradientMonitor": (lambda: GradientMonitor(log_every_n_steps=2), Ordered),
    "TrainingCurves": (lambda: TrainingCurves(every_n_epochs=0), Ordered),
    "CurvatureProbe": (lambda: CurvatureProbe(iters=3), Ordered),
    # VariationalLinear draws noise from the global RNG, which checkpoints do not carry: only the state is compared.
    "VariationalKL": (lambda: VariationalKL(warmup_steps=3), lambda: Regression(variational=True)),
    "WarmupDecay": (lambda: WarmupDecay(warmup_ratio=0.2, decay="cosine"), Ordered),
}


def comparable(state):
    if isinstance(state, dict):
        return {k: comparable(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return [comparable(v) for v in state]
    return state


@pytest.mark.parametrize("name", sorted(CASES))
def test_resume_at_an_epoch_boundary_is_exact(name, make_diag_trainer, tmp_path):
    make_callback, make_model = CASES[name]

    def train(checkpoint=None, save=False):
        callback = make_callback()
        callbacks = [callback]
        if save:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, save_on_train_epoch_end=True))
        torch.manual_seed(0)
        model = make_model()
        trainer = make_diag_trainer(max_epochs=3, limit_train_batches=3, callbacks=callbacks,
                                    enable_checkpointing=save, default_root_dir=tmp_path / ("a" if save else "b"))
        torch.manual_seed(1)
        trainer.fit(model, ckpt_path=checkpoint)
        return model, callback

    full_model, full = train(save=True)
    (path,) = (tmp_path / "ckpt").glob("epoch=0-*.ckpt")
    resumed_model, resumed = train(checkpoint=str(path))
    assert comparable(resumed.state_dict()) == comparable(full.state_dict())
    if name != "VariationalKL":
        for a, b in zip(full_model.parameters(), resumed_model.parameters()):
            assert torch.allclose(a, b, atol=1e-6)
