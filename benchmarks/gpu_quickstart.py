"""README command (a) on a CUDA GPU at each precision: the image pretraining, then the staged quick start (feature
cache, warmup, OGM-GE, Gaussian dropout, gradient checks in float64, report) under ``32-true``, ``16-mixed`` (a
GradScaler, which OGM-GE's gradient modulation and the gradient monitor must see unscaled) and ``bf16-mixed``.

Each command is the CLI run as a user runs it (``accelerator: auto`` picks the GPU); a row per run goes to
``--results`` as it finishes (wall time of the command, fit time, test metrics, the OGM-GE coefficients the run
logged), and a table is printed at the end. Needs a GPU; CI never runs it.

    python benchmarks/gpu_quickstart.py --work /tmp/gpu_qs --results gpu_quickstart.jsonl
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def cli(args: list[str], cwd: Path, log: Path) -> float:
    """Run ``ml-optim-plugins ARGS`` in ``cwd``; return its wall time. Fails with the log's tail."""
    start = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.run([sys.executable, "-m", "ml_optim_plugins.cli", *args], cwd=cwd, stdout=out, stderr=out).returncode
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"exit {code}: {' '.join(args)}\n{log.read_text()[-4000:]}")
    return seconds


def summary(run_dir: Path) -> dict[str, float | None]:
    """Test metrics and the OGM-GE coefficients (mean, min over the logged steps) of one run's metrics.csv."""
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    test = next(row for row in rows if row.get("test/f1"))
    out: dict[str, float | None] = {key: float(test[key]) for key in ("test/acc", "test/f1", "test/image/acc", "test/text/acc")}
    best = max(float(row["val/f1"]) for row in rows if row.get("val/f1"))
    out["best val/f1"] = best
    for name in ("image", "text"):
        values = [float(row[f"balance/{name}/coefficient"]) for row in rows if row.get(f"balance/{name}/coefficient")]
        out[f"{name} coefficient mean"] = sum(values) / len(values) if values else None
        out[f"{name} coefficient min"] = min(values) if values else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--precisions", nargs="+", default=["32-true", "16-mixed", "bf16-mixed"])
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark measures the recipes on a GPU")
    device = torch.cuda.get_device_name(0)
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    pretrain = cli(["fit", "-c", str(RECIPES / "pretrain_image.yaml")], args.work, args.work / "pretrain.log")
    for precision in args.precisions:
        name = f"quickstart-{precision}"
        seconds = cli(
            ["fit", "-c", str(RECIPES / "quickstart.yaml"), "--trainer.precision", precision],
            args.work, args.work / f"{name}.log",
        )
        run_dir = max((args.work / "runs" / "quickstart").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
        row = {"device": device, "precision": precision, "pretrain s": round(pretrain, 1), "command s": round(seconds, 1)}
        row.update(summary(run_dir))
        rows.append(row)
        with args.results.open("a") as out:
            out.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
