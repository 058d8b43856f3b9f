"""RunReport: the report and plots of a staged, balanced run, the final table from the logged metrics, the test column,
the whole history after testing a checkpoint and after a resume, and the errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from ml_optim_plugins import LinearProbeFinetune, ModalityBalancer, RunReport
from ml_optim_plugins.diagnostics import MetricHistory
from tests.finetuning.tiny import loader, tiny_staged_model, trainer


def table_row(report: str, head: str) -> list[float]:
    line = next(line for line in report.splitlines() if line.startswith(f"| {head} |"))
    return [float(cell) for cell in line.strip("|").split("|")[1:]]


def fit_staged(tmp_path: Path, max_epochs: int = 3, ckpt_path: str | None = None, **kwargs):
    report = RunReport()
    checkpoint = ModelCheckpoint(monitor="val/f1", mode="max", save_last=True)
    callbacks = [LinearProbeFinetune(probe_epochs=1), ModalityBalancer(method="ogm_ge", alpha=0.5), checkpoint, report]
    run = trainer(max_epochs=max_epochs, logger=CSVLogger(tmp_path, name="run", version=0), log_every_n_steps=1,
                  enable_checkpointing=True, callbacks=callbacks, **kwargs)
    model = tiny_staged_model()
    run.fit(model, loader(), loader(n=16), ckpt_path=ckpt_path)
    return run, model, report, checkpoint


@pytest.fixture(scope="module")
def staged_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("report")
    run, model, report, checkpoint = fit_staged(tmp_path)
    after_fit = (tmp_path / "run" / "version_0" / "report.md").read_text()
    results = run.test(model, loader(n=16), ckpt_path="best", verbose=False)[0]
    return tmp_path / "run" / "version_0", run, report, checkpoint, after_fit, results


def test_report_and_plots_are_written_at_the_end_of_fit(staged_run):
    directory, run, report, checkpoint, after_fit, _ = staged_run
    for plot in ("loss.png", "metrics.png", "lr.png", "balancing.png"):
        assert (directory / plot).stat().st_size > 1000 and f"]({plot})" in after_fit
    assert "| 0 | probe | 0 | 0 |" in after_fit and "| 1 | finetune | 1 | 6 |" in after_fit
    assert "test accuracy" not in after_fit and "val macro-F1" in after_fit
    assert f"{run.global_step} optimizer step(s)" in after_fit
    # The balancing section summarises the logged coefficients of the finetune stage (encoders frozen before).
    assert re.search(r"\| (image|text) \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \|", after_fit)
    assert {"encoders.image", "encoders.text", "fusion"} == set(report.lrs)
    assert [lr for _, lr in report.lrs["encoders.image"][:6]] == [0.0] * 6  # gated in the probe


def test_final_validation_figures_are_those_of_the_best_checkpoints_epoch(staged_run):
    directory, run, report, checkpoint, after_fit, _ = staged_run
    epoch = int(re.search(r"epoch=(\d+)", checkpoint.best_model_path).group(1))
    logged = next(values for _, values in report.history.rows if values.get("epoch") == epoch and "val/f1" in values)
    assert logged["val/f1"] == pytest.approx(float(checkpoint.best_model_score))
    fused = table_row(after_fit, "fused")
    assert fused == pytest.approx([logged["val/acc"], logged["val/f1"], logged["val/f1_weighted"]], abs=5e-5)
    assert table_row(after_fit, "image") == pytest.approx(
        [logged["val/image/acc"], logged["val/image/f1"], logged["val/image/f1_weighted"]], abs=5e-5
    )
    assert f"epoch {epoch}, the best val/f1" in after_fit


def test_testing_the_best_checkpoint_adds_the_test_column_and_keeps_the_history(staged_run):
    directory, run, report, checkpoint, after_fit, results = staged_run
    final = (directory / "report.md").read_text()
    fused = table_row(final, "fused")
    assert fused[:3] == table_row(after_fit, "fused")
    assert fused[3:] == pytest.approx([results["test/acc"], results["test/f1"], results["test/f1_weighted"]], abs=5e-5)
    assert f"test: checkpoint {Path(checkpoint.best_model_path).name}" in final
    # Loading the (earlier) best checkpoint for the test did not roll the history back to it.
    assert max(step for step, values in report.history.rows if "train/loss_step" in values) == run.global_step - 1


def test_a_resumed_run_reports_the_whole_run(tmp_path):
    first, _, _, checkpoint = fit_staged(tmp_path, max_epochs=2)
    resumed, _, report, _ = fit_staged(tmp_path, max_epochs=3, ckpt_path=checkpoint.last_model_path)
    steps = [step for step, values in report.history.rows if "train/loss_step" in values]
    assert steps == list(range(resumed.global_step))
    assert len(report.lrs["fusion"]) == resumed.global_step


def test_a_trainer_without_a_logger_is_an_error():
    with pytest.raises(ValueError, match="RunReport needs a logger"):
        trainer(max_epochs=1, callbacks=[RunReport()]).fit(tiny_staged_model(), loader())


@pytest.mark.parametrize("kwargs, message", [({"filename": "report.txt"}, "Markdown"), ({"smoothing": 0}, "smoothing")])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RunReport(**kwargs)


def test_history_keeps_finite_scalars_only():
    import torch

    history = MetricHistory()
    history.log_metrics({"a": torch.tensor(1.5), "b": float("nan"), "c": torch.ones(2), "d": 3}, step=4)
    assert history.rows == [(4, {"a": 1.5, "d": 3.0})] and history.keys() == {"a", "d"}
    assert history.nonfinite == {"b": 1}


def test_the_validation_column_follows_a_monitor_logged_outside_validation(tmp_path):
    """A checkpoint on a training metric: the validation column is the validation of the checkpoint's epoch."""
    report = RunReport()
    checkpoint = ModelCheckpoint(monitor="train/acc", mode="max")
    run = trainer(max_epochs=3, logger=CSVLogger(tmp_path, name="run", version=0), log_every_n_steps=1,
                  enable_checkpointing=True, callbacks=[checkpoint, report])
    run.fit(tiny_staged_model(), loader(), loader(n=16))
    epoch = int(re.search(r"epoch=(\d+)", checkpoint.best_model_path).group(1))
    assert report.final_source["val"].startswith(f"epoch {epoch}, the best train/acc")
    logged = next(v for _, v in report.history.rows if v.get("epoch") == epoch and "val/acc" in v)
    assert report.final["val"]["val/acc"] == logged["val/acc"]


def test_a_metric_of_the_users_logged_per_step_and_per_epoch_gets_its_column(tmp_path):
    """Lightning names such a metric val/NAME_epoch in the epoch's row: the table shows it as NAME."""
    model = tiny_staged_model()
    validation_step = model.validation_step

    def with_extra(batch, batch_idx, *args):
        model.log("val/extra", 0.25 + model.current_epoch, on_step=True, on_epoch=True)
        return validation_step(batch, batch_idx, *args)

    model.validation_step = with_extra
    report = RunReport()
    run = trainer(max_epochs=2, logger=CSVLogger(tmp_path, name="run", version=0), log_every_n_steps=1,
                  callbacks=[report])
    run.fit(model, loader(), loader(n=16))
    assert report.final["val"]["val/extra"] == 1.25  # the last validation's (no checkpoint selects another)
    header, _, fused = report.path.read_text().split("## Final metrics")[1].strip().splitlines()[:3]
    assert header.endswith("| val extra |") and fused.split("|")[-2].strip() == "1.2500"


def test_fast_dev_run_writes_no_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = RunReport()
    trainer(fast_dev_run=True, logger=CSVLogger(tmp_path), callbacks=[report]).fit(tiny_staged_model(), loader())
    assert report.path is None and not list(tmp_path.rglob("*.md")) and not list(tmp_path.rglob("*.png"))


def test_non_finite_values_are_counted_and_reported():
    history = MetricHistory()
    history.log_metrics({"train/loss": float("inf")}, step=1)
    history.log_metrics({"train/loss": float("nan"), "val/acc": 0.5}, step=2)
    assert history.nonfinite == {"train/loss": 2} and history.series("train/loss") == []


def test_a_validation_before_fit_stays_out_of_the_history(tmp_path):
    report = RunReport()
    run = trainer(max_epochs=1, logger=CSVLogger(tmp_path, name="run", version=0), log_every_n_steps=1,
                  callbacks=[report])
    model = tiny_staged_model()
    before = run.validate(model, loader(n=16), verbose=False)[0]
    assert report.history.rows == [] and report.final["val"]["val/acc"] == pytest.approx(before["val/acc"])
    run.fit(model, loader(), loader(n=16))
    validations = [values for _, values in report.history.rows if "val/acc" in values]
    assert len(validations) == 1 and validations[0]["epoch"] == 0  # fit's own, not the untrained model's
    assert report.final["val"]["val/acc"] == pytest.approx(validations[0]["val/acc"])


def test_only_loaders_with_a_padding_distributed_sampler_count_as_padded():
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
    from torch.utils.data import DataLoader, DistributedSampler

    from ml_optim_plugins.diagnostics.report import _pads_samples

    data = list(range(5))
    padded = DataLoader(data, sampler=DistributedSampler(data, num_replicas=2, rank=1, shuffle=False))
    unpadded = DataLoader(data, sampler=UnrepeatedDistributedSampler(data, num_replicas=2, rank=1, shuffle=False))
    assert len(list(padded)) == 3 and len(list(unpadded)) == 2  # rank 1's share: sample 0 again, or not
    assert _pads_samples(padded) and _pads_samples([unpadded, padded])
    assert not any(_pads_samples(loaders) for loaders in (unpadded, [unpadded], DataLoader(data), None))
