"""Shared fixtures: offline settings, tiny data and models, a CLI runner (in-process and as a subprocess), DDP runs
whose processes start together (tests/launcher.py)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Image check verdicts of the tests' generated files go to a temporary folder, not the user's cache; removed when the
# session ends (subprocesses inherit the variable and finish before it).
if "ML_OPTIM_PLUGINS_CACHE" not in os.environ:
    os.environ["ML_OPTIM_PLUGINS_CACHE"] = tempfile.mkdtemp(prefix="mop-cache-")
    atexit.register(shutil.rmtree, os.environ["ML_OPTIM_PLUGINS_CACHE"], ignore_errors=True)
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import contextlib
import io
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger

from ml_optim_plugins import (
    ConcatFusion,
    Fusion,
    MultimodalClassifier,
    SentenceTransformerTextEncoder,
    SyntheticSentimentDataModule,
    TimmImageEncoder,
)
from tests.launcher import (
    REPO,
    PreloadedPython,
    Start,
    lightning_environment,
    run_ranks,
    start_fresh,
    subprocess_environment,
)

QUICKSTART = REPO / "recipes" / "quickstart.yaml"

torch.set_num_threads(2)


def make_tiny_datamodule(**overrides) -> SyntheticSentimentDataModule:
    """Synthetic data small enough for a few-second fit."""
    args = dict(train_size=32, val_size=16, test_size=16, image_size=32, batch_size=8, max_length=24)
    args.update(overrides)
    return SyntheticSentimentDataModule(**args)


def make_tiny_model(fusion: Fusion | None = None, **overrides) -> MultimodalClassifier:
    """A small timm CNN and the packaged MiniLM, ready for the tiny synthetic data."""
    encoders = {
        "image": TimmImageEncoder("test_resnet"),
        "text": SentenceTransformerTextEncoder("all-MiniLM-L6-v2", max_seq_length=24),
    }
    return MultimodalClassifier(encoders, fusion=fusion or ConcatFusion(), num_classes=3, **overrides)


@pytest.fixture
def tiny_datamodule() -> SyntheticSentimentDataModule:
    return make_tiny_datamodule()


@pytest.fixture
def tiny_model() -> MultimodalClassifier:
    torch.manual_seed(0)
    return make_tiny_model()


def write_tiny_config(directory: Path) -> Path:
    """The quick-start recipe shrunk to seconds: tiny data, a tiny CNN, one short epoch, logs under ``directory``."""
    config = yaml.safe_load(QUICKSTART.read_text())
    image = config["model"]["init_args"]["encoders"]["image"]["init_args"]
    image["model_name"] = "test_resnet"
    # The recipe loads the encoder pretrained by recipes/pretrain_image.yaml; tests/test_cli.py runs that pipeline.
    image.pop("checkpoint_path"), image.pop("checkpoint_prefix")
    config["model"]["init_args"]["encoders"]["text"]["init_args"]["max_seq_length"] = 24
    config["data"]["init_args"].update(
        train_size=32, val_size=16, test_size=16, image_size=32, batch_size=8, max_length=24
    )
    trainer = config["trainer"]
    trainer.update(max_epochs=1, accelerator="cpu", log_every_n_steps=1, enable_model_summary=False)
    for logger in trainer["logger"]:
        logger["init_args"]["save_dir"] = str(directory / "runs")
    # No Rich bar in captured output; no whole-model gradient check in every CLI test (tests/gradcheck covers it).
    dropped = ("RichProgressBar", "GradientCheck")
    trainer["callbacks"] = [c for c in trainer["callbacks"] if not c["class_path"].endswith(dropped)]
    path = directory / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    """The quick-start recipe shrunk to seconds: tiny data, a tiny CNN, one short epoch, logs under tmp_path."""
    return write_tiny_config(tmp_path)


@dataclass(frozen=True)
class TinyRun:
    """A finished ``fit`` of the tiny quick start: its config, its selected checkpoint and what it printed."""

    directory: Path
    config: Path
    checkpoint: Path
    printed: str


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    """One short fit of the tiny quick start, shared by the tests that need a trained checkpoint (read-only)."""
    from ml_optim_plugins.cli import run

    directory = tmp_path_factory.mktemp("tiny-run")
    config = write_tiny_config(directory)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        cli = run(["fit", "-c", str(config), "--trainer.limit_train_batches", "2", "--test_after_fit", "false"])
    checkpoint = Path(cli.trainer.checkpoint_callback.best_model_path)
    return TinyRun(directory, config, checkpoint, printed.getvalue())


class WeightWatch(pl.Callback):
    """Records, per training batch, whether any weight changed (a skipped step changes none)."""

    def __init__(self) -> None:
        self.changed: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.changed.append(any(not torch.equal(a, p) for a, p in zip(self.before, pl_module.parameters())))


def gloo_threads() -> list[str]:
    """Names of this process's native threads that belong to a gloo process group or its TCPStore (Linux's /proc)."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        pytest.skip("native thread names need Linux's /proc")
    names = [(task / "comm").read_text().strip() for task in tasks.iterdir()]
    return sorted(name for name in names if name.startswith(("pt_gloo", "gloo_", "pt_tcpstore")))


@pytest.fixture
def run_python_subprocess(tmp_path: Path):
    """Run ``python ARGS`` in a fresh process in ``tmp_path`` (needed for DDP), failing with its output."""

    def run(*args: str, timeout: float = 300.0) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, *args], cwd=tmp_path, env=subprocess_environment(),
                                capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"exit {result.returncode}\nSTDOUT:\n{result.stdout}\nSTDERR:\n{result.stderr[-5000:]}"
        return result

    return run


@pytest.fixture
def run_cli_subprocess(run_python_subprocess):
    """Run ``python -m ml_optim_plugins.cli ARGS`` in a fresh process (needed for DDP), failing with its output."""

    def run(*args: str, timeout: float = 300.0) -> subprocess.CompletedProcess:
        return run_python_subprocess("-m", "ml_optim_plugins.cli", *args, timeout=timeout)

    return run


@pytest.fixture(scope="session")
def preloaded_python():
    """An interpreter that imported the library once, for the session: ``run_ddp_ranks`` forks its processes from it
    (tests/preloaded_python.py says what a forked process does not share with a fresh one)."""
    python = PreloadedPython()
    yield python
    python.close()


DDP_FIXTURES = {"run_ddp_ranks", "run_ddp_cli", "start_ddp_process"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that starts DDP processes through the fixtures below as ``ddp`` (``pytest -m ddp``); the tests
    that go through Lightning's own launcher carry the mark themselves."""
    for item in items:
        if DDP_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ddp)


@pytest.fixture
def start_ddp_process(request: pytest.FixtureRequest) -> Start:
    """How the DDP tests start a process: forked from ``preloaded_python``, so it imports nothing (a fresh interpreter
    spends ~12 s of CPU importing torch, Lightning and torchmetrics); with ``ML_OPTIM_PLUGINS_TESTS_FRESH=1`` in the
    environment, a fresh interpreter."""
    if os.environ.get("ML_OPTIM_PLUGINS_TESTS_FRESH") == "1":
        return start_fresh
    return request.getfixturevalue("preloaded_python").start


@pytest.fixture
def run_ddp_ranks(tmp_path: Path, start_ddp_process: Start):
    """Run ``python ARGS`` in ``tmp_path`` as the ``processes`` (2) processes of a DDP run on this machine, started
    together (``start_ddp_process``) with the variables Lightning's launcher would give them (:func:`run_ranks`:
    failing, unless ``check=False``, when one fails, hangs or dies by a signal, with every process's output); their
    results by rank. The script's ``Trainer(devices=processes, strategy="ddp")`` finds ``LOCAL_RANK`` set and starts
    nothing."""

    def run(*args: str, processes: int = 2, timeout: float = 300.0, check: bool = True) -> list:
        return run_ranks(args, tmp_path, lightning_environment(processes), processes, timeout, check, start_ddp_process)

    return run


@pytest.fixture
def run_ddp_cli(run_ddp_ranks):
    """Run ``python -m ml_optim_plugins.cli ARGS`` as the 2 processes of a DDP run (``run_ddp_ranks``); the command
    line must ask for them (``--trainer.devices 2 --trainer.strategy ddp``)."""

    def run(*args: str, timeout: float = 300.0) -> list:
        return run_ddp_ranks("-m", "ml_optim_plugins.cli", *args, timeout=timeout)

    return run


@pytest.fixture
def make_diag_trainer(tmp_path: Path):
    """A quiet CPU Trainer with a CSV logger in tmp_path (its log_dir receives reports and plots)."""

    def make(**kwargs) -> pl.Trainer:
        args = dict(
            accelerator="cpu", devices=1, max_epochs=1, limit_val_batches=0, logger=CSVLogger(tmp_path),
            log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=tmp_path,
        )
        args.update(kwargs)
        return pl.Trainer(**args)

    return make
