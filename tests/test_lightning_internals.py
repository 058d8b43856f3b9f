"""``ml_optim_plugins.lightning_internals`` against the installed Lightning and torch: each adapter is exercised for the
meaning the library relies on, and fails with the private name and the version it was checked on when that changes.
And a scan of the package source: no module but the adapter touches a private attribute of Lightning or torch."""

from __future__ import annotations

import ast
import csv
from collections.abc import Iterator
from pathlib import Path

import lightning
import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

import ml_optim_plugins
from ml_optim_plugins import lightning_internals
from ml_optim_plugins.data import EpochShuffle
from ml_optim_plugins.lightning_internals import (
    load_pending_train_loader_state,
    logger_version_unset,
    logging_step,
    optimizer_unscales_in_step,
    prepend_csv_rows,
    make_resumed_epochs_iterator_after_its_hooks,
    resumed_after_an_epochs_last_batch,
    resumed_mid_epoch,
    set_logger_version,
    set_train_sampler_epochs,
)

CHECKED_ON = "checked on Lightning 2.6.6 / torch 2.14"
INSTALLED = f"installed: Lightning {lightning.__version__}, torch {torch.__version__}"


def changed(what: str) -> str:
    return f"{what} ({CHECKED_ON}; {INSTALLED}): update ml_optim_plugins/lightning_internals.py"


def quiet_trainer(**kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, limit_val_batches=0)
    return pl.Trainer(**{**defaults, **kwargs})


# ------------------------------------------------------------------ the train loader's pending state, the log step
class Indices(Dataset):
    """Sample i is the number i, so a batch says where in the epoch a run is."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([float(index)])


class RecordsBatches(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(1, 1)
        self.seen: list[int] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(int(batch[0, 0]))
        return self.layer(batch).sum()

    def configure_optimizers(self):
        self.trainer.estimated_stepping_batches  # sets the loader up before the restore: Lightning #20550
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return StatefulDataLoader(Indices(), batch_size=1)


class CallsAdapters(Callback):
    def __init__(self) -> None:
        self.loaded: bool | None = None
        self.steps: list[int] = []

    def on_train_start(self, trainer, pl_module):
        self.loaded = load_pending_train_loader_state(trainer)

    def on_train_epoch_start(self, trainer, pl_module):
        set_train_sampler_epochs(trainer, trainer.current_epoch)
        make_resumed_epochs_iterator_after_its_hooks(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append(logging_step(trainer))


@pytest.fixture(scope="module")
def step_3_checkpoint(tmp_path_factory) -> Path:
    """A one-epoch run of 8 batches with a checkpoint after its third optimizer step."""
    directory = tmp_path_factory.mktemp("pending_state")
    checkpoint = ModelCheckpoint(dirpath=directory, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    quiet_trainer(max_epochs=1, callbacks=[checkpoint], enable_checkpointing=True).fit(RecordsBatches())
    return directory / "step=3.ckpt"


def test_a_resumed_epoch_goes_on_from_the_checkpoints_batch(step_3_checkpoint):
    """Lightning #20550: with the loader set up before the restore, the saved loader state waits in
    ``FitLoop._combined_loader_states_to_load`` and the resumed epoch would start from batch 0 again."""
    assert lightning_internals._set_sampler_epoch is not None, changed(
        "lightning.fabric.utilities.data._set_sampler_epoch is gone"
    )
    model, adapters = RecordsBatches(), CallsAdapters()
    quiet_trainer(max_epochs=1, callbacks=[adapters]).fit(model, ckpt_path=step_3_checkpoint)
    assert adapters.loaded, changed(
        "FitLoop._combined_loader_states_to_load held no pending state after a resume: Lightning #20550 may be fixed "
        "(then drop load_pending_train_loader_state), or FitLoop._combined_loader_states_to_load / "
        "_load_combined_loader_states / _data_fetcher / _combined_loader changed"
    )
    assert model.seen == [3, 4, 5, 6, 7], changed(
        f"resumed after 3 batches, the run trained on samples {model.seen}: FitLoop's private loader state changed"
    )
    assert adapters.steps[0] == 3, changed(
        f"logging_step at the resumed run's first batch is {adapters.steps[0]}, not 3: "
        "FitLoop.epoch_loop._batches_that_stepped changed"
    )


class ShuffledByWorkers(RecordsBatches):
    """The recipes' loader: an epoch-seeded shuffle served by worker processes (an iterator with workers draws its
    first batches' indices when it is made), with validation at each epoch's end."""

    def __init__(self, workers: int, early_setup: bool) -> None:
        super().__init__()
        self.workers, self.early_setup = workers, early_setup

    def training_step(self, batch, batch_idx):
        self.seen.extend(int(value) for value in batch[:, 0])
        return self.layer(batch).sum()

    def configure_optimizers(self):
        if self.early_setup:  # as WarmupDecay does: Lightning #20550, the loader's state left pending
            return super().configure_optimizers()
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return StatefulDataLoader(Indices(), batch_size=2, sampler=EpochShuffle(8, seed=0), num_workers=self.workers,
                                  persistent_workers=self.workers > 0)

    def validation_step(self, batch, batch_idx):
        pass

    def val_dataloader(self):
        return DataLoader(Indices(), batch_size=8)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("early_setup", [True, False], ids=["loader-set-up-early", "loader-set-up-by-lightning"])
@pytest.mark.parametrize(("saving", "checkpoint", "served"), [
    # After epoch 0's validation: the next epoch starts afresh. Inside epoch 1: it goes on from its third batch.
    pytest.param({"filename": "{epoch}"}, "epoch=0.ckpt", 8, id="epoch-end"),
    pytest.param({"every_n_train_steps": 6, "filename": "{step}"}, "step=6.ckpt", 12, id="mid-epoch"),
])
def test_a_resumed_run_serves_each_epochs_own_order(tmp_path, saving, checkpoint, served, early_setup, workers):
    """The iterator that serves a resumed run's first epoch is made before Lightning sets the samplers' epoch, in its
    early setup (#20550) or when it loads the loader's state; with workers it draws its first indices right then
    (seen on MVSA-Single: a run resumed after epoch 0 trained epoch 1 in epoch 0's order). EpochShuffle keeps its
    epoch and place in the loader's state, and the pending-state adapter gives the samplers their epoch, so the
    resumed run sees the samples the uninterrupted one saw, in the same order."""
    whole = ShuffledByWorkers(workers, early_setup)
    saver = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, **saving)
    quiet_trainer(max_epochs=3, callbacks=[saver], enable_checkpointing=True, limit_val_batches=1).fit(whole)
    assert whole.seen[:8] != whole.seen[8:16] and sorted(whole.seen[8:16]) == list(range(8))
    resumed = ShuffledByWorkers(workers, early_setup)
    quiet_trainer(max_epochs=3, callbacks=[CallsAdapters()], limit_val_batches=1).fit(
        resumed, ckpt_path=tmp_path / checkpoint)
    assert resumed.seen == whole.seen[served:], changed(
        f"resumed from {checkpoint}, the run trained on samples {resumed.seen}, not {whole.seen[served:]}: the "
        "train loader's iterator or its samplers' epoch after a restore changed"
    )


class EpochStartAdapters(Callback):
    """Records, at each epoch start, Lightning's sampler epoch, whether the iterator was made here and whether the
    sampler epoch could be set."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, int, bool, bool]] = []
        self.mid_epoch: bool | None = None

    def on_train_start(self, trainer, pl_module):
        self.mid_epoch = resumed_mid_epoch(trainer) or resumed_after_an_epochs_last_batch(trainer)

    def on_train_epoch_start(self, trainer, pl_module):
        sampler = trainer.train_dataloader.sampler
        lightnings = sampler.epoch
        self.rows.append((trainer.current_epoch, lightnings, set_train_sampler_epochs(trainer, trainer.current_epoch),
                          make_resumed_epochs_iterator_after_its_hooks(trainer)))


@pytest.mark.parametrize(("limit", "lightnings_epochs", "made_here"), [
    ({"max_epochs": 3}, [1, 2], True),
    # Resumed as a restart at the epoch's end: Lightning finishes epoch 0 again, then makes epoch 1's iterator itself;
    # its sampler epoch counts processed epochs, one ahead.
    ({"max_steps": 12, "max_epochs": -1}, [2, 3], False),
], ids=["epochs", "steps"])
def test_the_epoch_start_adapters_after_an_epoch_end_resume(tmp_path, limit, lightnings_epochs, made_here):
    """Lightning keeps its setup's iterator for a resumed run's first epoch unless it restarts that epoch's end
    (restart_train_iterator makes it anew there only) and, under max_steps, sets the samplers' epoch one ahead of
    current_epoch (set_train_sampler_epochs corrects it)."""
    saver = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, filename="{epoch}")
    quiet_trainer(**limit, callbacks=[saver], enable_checkpointing=True, limit_val_batches=1).fit(
        ShuffledByWorkers(0, False))
    adapters = EpochStartAdapters()
    quiet_trainer(**limit, callbacks=[adapters], limit_val_batches=1).fit(
        ShuffledByWorkers(0, False), ckpt_path=tmp_path / "epoch=0.ckpt")
    assert adapters.mid_epoch is False, changed("FitLoop.restarted_mid_epoch is set after an epoch-end resume")
    assert adapters.rows == [(1, lightnings_epochs[0], True, made_here), (2, lightnings_epochs[1], True, False)], changed(
        f"epoch starts after an epoch-end resume (epoch, Lightning's sampler epoch, sampler epochs set, iterator made "
        f"here): {adapters.rows}; Lightning's iterator rule (_TrainingEpochLoop.on_run_start, FitLoop.is_resuming) or "
        "its sampler epoch (FitLoop.epoch_progress.current.processed) changed"
    )


class ValidatesTwicePerEpoch(ShuffledByWorkers):
    """Sequential batches, validation every half epoch (Trainer(val_check_interval=0.5))."""

    def __init__(self) -> None:
        super().__init__(0, True)

    def train_dataloader(self):
        return StatefulDataLoader(Indices(), batch_size=2)


class RecordsResumeKind(Callback):
    def __init__(self) -> None:
        self.after_last_batch: bool | None = None
        self.loaded: bool | None = None
        self.epoch_starts: list[int] = []

    def on_train_start(self, trainer, pl_module):
        self.after_last_batch = resumed_after_an_epochs_last_batch(trainer)
        self.loaded = load_pending_train_loader_state(trainer)

    def on_train_epoch_start(self, trainer, pl_module):
        self.epoch_starts.append(trainer.current_epoch)


@pytest.mark.parametrize(("saving", "checkpoint", "after_last_batch", "epoch_starts"), [
    # At the end of epoch 0's last batch, before its validation: Lightning goes on to epoch 1 without its start hooks.
    pytest.param({"every_n_train_steps": 4, "filename": "{step}"}, "step=4.ckpt", True, [2], id="last-batch-end"),
    # After the validation that follows the last batch: Lightning finishes epoch 0, then starts epoch 1 with them.
    pytest.param({"filename": "{epoch}-{step}"}, "epoch=0-step=4.ckpt", False, [1, 2], id="validation-end"),
])
def test_a_resume_after_an_epochs_last_batch_is_told_from_one_after_its_validation(
    tmp_path, saving, checkpoint, after_last_batch, epoch_starts
):
    """Both checkpoints come after epoch 0's last batch (validation every half epoch, so the one after validation is
    saved inside the epoch too); only the first skips epoch 1's start hooks. The loader's pending state (#20550) is
    that of the finished epoch in both: dropped at the last batch's end, where it would serve epoch 1 no batch."""
    saver = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, **saving)
    whole = ValidatesTwicePerEpoch()
    quiet_trainer(max_epochs=3, callbacks=[saver], enable_checkpointing=True, limit_val_batches=1,
                  val_check_interval=0.5).fit(whole)
    resumed, kind = ValidatesTwicePerEpoch(), RecordsResumeKind()
    quiet_trainer(max_epochs=3, callbacks=[kind], limit_val_batches=1, val_check_interval=0.5).fit(
        resumed, ckpt_path=tmp_path / checkpoint)
    assert kind.after_last_batch is after_last_batch, changed(
        f"resumed from {checkpoint}: FitLoop.restarted_mid_epoch, _TrainingEpochLoop.restarted_on_train_batch_end or "
        "batch_progress.is_last_batch changed"
    )
    assert kind.epoch_starts == epoch_starts, changed(f"epoch-start hooks after a resume from {checkpoint}")
    # The pending loader state is that of the finished epoch: loaded after the validation (Lightning ends the restarted
    # epoch 0 at once and makes epoch 1's iterator itself), dropped at the last batch's end.
    assert kind.loaded is not after_last_batch
    assert resumed.seen == whole.seen[8:]  # epochs 1 and 2, each in full


class TwoStepsPerBatch(pl.LightningModule):
    """Manual optimization, two optimizer steps per batch: ``global_step`` counts 2 per batch, the log step 1."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.a, self.b = nn.Linear(1, 1), nn.Linear(1, 1)

    def training_step(self, batch, batch_idx):
        for layer, optimizer in zip((self.a, self.b), self.optimizers()):
            loss = layer(batch).sum()
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
        self.log("loss", loss)

    def configure_optimizers(self):
        return torch.optim.SGD(self.a.parameters(), lr=0.01), torch.optim.SGD(self.b.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(Indices(), batch_size=2)


def test_logging_step_is_the_step_lightning_logs_with(tmp_path):
    adapters = CallsAdapters()
    trainer = quiet_trainer(max_epochs=1, callbacks=[adapters], logger=CSVLogger(tmp_path), log_every_n_steps=1)
    trainer.fit(TwoStepsPerBatch())
    assert hasattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped"), changed(
        "FitLoop.epoch_loop._batches_that_stepped is gone (logging_step falls back to global_step)"
    )
    rows = list(csv.DictReader(Path(trainer.logger.log_dir, "metrics.csv").open()))
    logged = [int(row["step"]) for row in rows if row.get("loss")]
    assert trainer.global_step == 8 and logged == adapters.steps == [0, 1, 2, 3], changed(
        f"Lightning logged the 4 batches at steps {logged}, logging_step said {adapters.steps}: the meaning of "
        "FitLoop.epoch_loop._batches_that_stepped changed"
    )


# ------------------------------------------------------------------ loggers
@pytest.mark.parametrize("make", [CSVLogger, TensorBoardLogger], ids=["CSVLogger", "TensorBoardLogger"])
def test_a_built_logger_takes_a_version(make, tmp_path):
    (tmp_path / "run" / "version_0").mkdir(parents=True)
    fresh, pinned = make(tmp_path, name="run"), make(tmp_path, name="run", version=3)
    assert logger_version_unset(fresh) and not logger_version_unset(pinned), changed(
        f"{make.__name__}._version no longer reads None until the version is picked"
    )
    assert set_logger_version(fresh, 7), changed(f"{make.__name__} has no _version")
    assert fresh.version == 7 and Path(fresh.log_dir) == tmp_path / "run" / "version_7", changed(
        f"{make.__name__}._version set to 7 gives version {fresh.version}, log_dir {fresh.log_dir}"
    )
    picked = make(tmp_path, name="run")
    assert picked.version == 1 and not logger_version_unset(picked), changed(
        f"{make.__name__} that picked version_{picked.version} still reads as unset"
    )


def test_a_logger_without_a_version_is_left_alone():
    from ml_optim_plugins.diagnostics.report import MetricHistory

    history = MetricHistory()
    assert not logger_version_unset(history) and not set_logger_version(history, 3)
    assert not hasattr(history, "_version")


def test_rows_put_before_the_pending_ones_come_first_in_metrics_csv(tmp_path):
    logger = CSVLogger(tmp_path)
    logger.log_metrics({"loss": 0.5}, step=5)
    assert prepend_csv_rows(logger.experiment, [{"loss": "0.25", "epoch": "0", "step": "2"}]), changed(
        "the CSV writer (lightning.fabric.loggers.csv_logs._ExperimentWriter) keeps no list `metrics`"
    )
    logger.save()
    rows = list(csv.DictReader(Path(logger.log_dir, "metrics.csv").open()))
    written = [(row["step"], row["loss"], row["epoch"]) for row in rows]
    assert written == [("2", "0.25", "0"), ("5", "0.5", "")], changed(
        f"rows put in _ExperimentWriter.metrics were written as {rows}"
    )


# ------------------------------------------------------------------ AMP with optimizers that unscale in their step
class OneStep(pl.LightningModule):
    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.fused = fused
        self.layer = nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        if self.fused:
            return torch.optim.Adam(self.parameters(), lr=0.1, fused=True)
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(torch.randn(4, 4), batch_size=4)


class GradientsAtTheHook(Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.unscales_in_step = optimizer_unscales_in_step(optimizer)
        self.grad = pl_module.layer.weight.grad.clone()
        self.scale = float(trainer.precision_plugin.scaler.get_scale())


def gradients_under_16_mixed(fused: bool) -> GradientsAtTheHook:
    from lightning.pytorch.plugins.precision import MixedPrecision

    torch.manual_seed(0)
    hook = GradientsAtTheHook()
    # float16 autocast with a GradScaler on CPU (the Trainer's `precision="16-mixed"` would take bf16 there).
    plugin = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=256.0))
    quiet_trainer(max_steps=1, callbacks=[hook], plugins=[plugin]).fit(OneStep(fused))
    return hook


def test_an_optimizer_that_unscales_in_its_step_leaves_scaled_gradients_to_the_hooks():
    """What ModalityBalancer (MMPareto) relies on: under ``16-mixed``, ``on_before_optimizer_step`` sees gradients
    still multiplied by the loss scale exactly when ``optimizer_unscales_in_step`` says so."""
    from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling

    plain, fused = gradients_under_16_mixed(False), gradients_under_16_mixed(True)
    assert (plain.unscales_in_step, fused.unscales_in_step) == (False, True), changed(
        "torch's fused Adam no longer sets `_step_supports_amp_scaling`"
    )
    weight = nn.Parameter(torch.ones(1))
    for optimizer in (torch.optim.SGD([weight]), torch.optim.Adam([weight], fused=True)):
        assert optimizer_unscales_in_step(optimizer) == _optimizer_handles_unscaling(optimizer), changed(
            f"Lightning's _optimizer_handles_unscaling decides otherwise for {type(optimizer).__name__}"
        )
    assert fused.scale > 1 and torch.allclose(fused.grad, plain.grad * fused.scale, rtol=1e-3), changed(
        f"gradients at on_before_optimizer_step with fused Adam / SGD: ratio {(fused.grad / plain.grad).flatten()}, "
        f"loss scale {fused.scale}: Lightning's MixedPrecision plugin unscales differently"
    )


# ------------------------------------------------------------------ the source scan
PACKAGE = Path(ml_optim_plugins.__file__).parent
ADAPTER = "lightning_internals.py"
THIRD_PARTY = {"lightning", "lightning_fabric", "lightning_utilities", "pytorch_lightning", "torch", "torchdata",
               "torchmetrics"}
# The one private torch name left in finetuning/ (resolving encoder blocks through a torch.compile wrapper); the
# scan fails if it goes, so the list only shrinks.
ALLOWED_IN_FINETUNING = {
    "_orig_mod",  # torch.compile's OptimizedModule: the compiled module (finetuning/blocks.py)
}


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def names_defined(tree: ast.AST) -> set[str]:
    """The private names that code defines: functions, classes, variables and attributes of ``self`` / ``cls``."""
    defined = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and isinstance(node.value, ast.Name):
            if node.value.id in ("self", "cls"):
                defined.add(node.attr)
    return {name for name in defined if is_private(name)}


def private_uses(source: str, package_names: set[str]) -> Iterator[tuple[int, str, str]]:
    """``(line, private name, code)`` for each use in ``source`` of a private attribute or import that belongs to
    another library. Ours: attributes of ``self`` / ``cls`` / ``super()`` that the package defines, attributes defined
    in the class the code is in (another instance of it), and attributes of names imported from the package."""
    tree = ast.parse(source)
    own_imports = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level or module.split(".")[0] == "ml_optim_plugins":
                own_imports |= {alias.asname or alias.name for alias in node.names}
            elif module.split(".")[0] in THIRD_PARTY:
                for part in [*module.split("."), *(alias.name for alias in node.names)]:
                    if is_private(part):
                        yield node.lineno, part, ast.unparse(node)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "ml_optim_plugins":
                    own_imports.add((alias.asname or alias.name).split(".")[0])
                elif alias.name.split(".")[0] in THIRD_PARTY:
                    for part in alias.name.split("."):
                        if is_private(part):
                            yield node.lineno, part, ast.unparse(node)

    def visit(node: ast.AST, class_names: set[str]) -> Iterator[tuple[int, str, str]]:
        if isinstance(node, ast.ClassDef):
            class_names = names_defined(node)
        accessed = None
        if isinstance(node, ast.Attribute):
            accessed = node.value, node.attr
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            accessed = node.args[0], node.args[1].value
        if accessed is not None and is_private(accessed[1]):
            receiver, name = accessed
            own_receiver = isinstance(receiver, ast.Name) and receiver.id in ("self", "cls") or (
                isinstance(receiver, ast.Call) and isinstance(receiver.func, ast.Name) and receiver.func.id == "super"
            )
            ours = (
                (own_receiver and name in package_names)
                or name in class_names
                or (isinstance(receiver, ast.Name) and receiver.id in own_imports)
            )
            if not ours:
                yield node.lineno, name, ast.unparse(node)
        for child in ast.iter_child_nodes(node):
            yield from visit(child, class_names)

    yield from visit(tree, set())


def package_sources() -> dict[str, str]:
    return {path.relative_to(PACKAGE).as_posix(): path.read_text() for path in sorted(PACKAGE.rglob("*.py"))}


def test_the_scan_finds_private_uses_and_only_those():
    package_names = {"_check_fits", "_helper", "_seen"}
    source = '''
"""Docstrings may name ``trainer._private`` and ``logger._version``."""
from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling
from torch.nn.modules.batchnorm import BatchNorm1d as Norm
import torch._dynamo
from ml_optim_plugins.names import _helper
from ml_optim_plugins import evaluation
from . import sibling

class Schedule:
    def resolve(self):
        other = Schedule()
        other._check_fits()
        self._seen = getattr(self, "_seen", 0)
        return evaluation._internal(sibling._x, _helper())

    def _check_fits(self):
        logger._version = 3
        self._trainer.fit()
        super()._hook()
        return getattr(module, "_trainer", None), torch.nn.modules.batchnorm._NormBase
'''
    found = sorted((name, code) for _, name, code in private_uses(source, package_names))
    assert found == sorted([
        ("_optimizer_handles_unscaling",
         "from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling"),
        ("_dynamo", "import torch._dynamo"),
        ("_version", "logger._version"),
        ("_trainer", "self._trainer"),
        ("_hook", "super()._hook"),
        ("_trainer", "getattr(module, '_trainer', None)"),
        ("_NormBase", "torch.nn.modules.batchnorm._NormBase"),
    ])


def test_no_module_but_the_adapter_uses_private_lightning_or_torch_api():
    sources = package_sources()
    package_names = set().union(*(names_defined(ast.parse(source)) for source in sources.values()))
    found, allowed_seen = [], set()
    for path, source in sources.items():
        if path == ADAPTER:
            continue
        for line, name, code in private_uses(source, package_names):
            if path.startswith("finetuning/") and name in ALLOWED_IN_FINETUNING:
                allowed_seen.add(name)
            else:
                found.append(f"{path}:{line}: {code}")
    assert not found, (
        "private Lightning / torch API outside lightning_internals.py: use a public way, or add a function to "
        "lightning_internals.py that names the attribute and the versions it was checked on, with a test here:\n"
        + "\n".join(found)
    )
    assert allowed_seen == ALLOWED_IN_FINETUNING, (
        f"finetuning/ no longer uses {sorted(ALLOWED_IN_FINETUNING - allowed_seen)}: remove them from "
        "ALLOWED_IN_FINETUNING"
    )


def test_the_adapter_itself_is_seen_by_the_scan():
    """The scan is not blind: the adapter's private uses are found (and only there are they allowed)."""
    names = {name for _, name, _ in private_uses(package_sources()[ADAPTER], set())}
    assert {"_batches_that_stepped", "_version", "_step_supports_amp_scaling", "_set_sampler_epoch"} <= names
