"""Draw one PNG per warmup and decay shape for docs/schedules.md.

    python docs/make_schedule_figures.py            # writes docs/figures/schedules/*.png
    python docs/make_schedule_figures.py OUT_DIR

Every curve is computed by WarmupDecaySchedule.lr itself, on a 1000-step run with base LR 1.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ml_optim_plugins.schedules import WarmupDecaySchedule

TOTAL = 1000
OUT = Path(__file__).resolve().parent / "figures" / "schedules"

# file name -> (title, schedule arguments); decays use a 100-step linear warmup unless they say otherwise.
FIGURES: dict[str, tuple[str, dict[str, Any]]] = {
    "warmup-linear": ("warmup='linear', start 0", {"warmup_steps": 300, "decay": "constant"}),
    "warmup-cosine": ("warmup='cosine', start 0.1", {"warmup_steps": 300, "warmup": "cosine", "warmup_start_factor": 0.1, "decay": "constant"}),
    "warmup-exponential": ("warmup='exponential', start 0.01", {"warmup_steps": 300, "warmup": "exponential", "warmup_start_factor": 0.01, "decay": "constant"}),
    "warmup-constant": ("warmup='constant', factor 0.1", {"warmup_steps": 300, "warmup": "constant", "warmup_start_factor": 0.1, "decay": "constant"}),
    "decay-constant": ("decay='constant'", {"warmup_steps": 100, "decay": "constant"}),
    "decay-linear": ("decay='linear', min_lr_ratio 0.1", {"warmup_steps": 100, "decay": "linear", "min_lr_ratio": 0.1}),
    "decay-cosine": ("decay='cosine', min_lr_ratio 0.1", {"warmup_steps": 100, "decay": "cosine", "min_lr_ratio": 0.1}),
    "decay-cosine-restarts": ("decay='cosine', cycles 3, cycle_mul 2, cycle_decay 0.7", {"warmup_steps": 100, "decay": "cosine", "cycles": 3, "cycle_mul": 2.0, "cycle_decay": 0.7}),
    "decay-polynomial": ("decay='polynomial', power 2", {"warmup_steps": 100, "decay": "polynomial", "power": 2.0}),
    "decay-exponential": ("decay='exponential', gamma 0.997", {"warmup_steps": 100, "decay": "exponential", "gamma": 0.997}),
    "decay-step": ("decay='step', step_size 300, gamma 0.3", {"warmup_steps": 100, "decay": "step", "step_size": 300, "gamma": 0.3}),
    "decay-multistep": ("decay='multistep', milestones 500/800", {"warmup_steps": 100, "decay": "multistep", "milestones": [500, 800]}),
    "decay-inverse-sqrt": ("decay='inverse_sqrt' (timescale = warmup)", {"warmup_steps": 100, "decay": "inverse_sqrt"}),
    "decay-wsd": ("decay='wsd', cooldown_ratio 0.2, '1-sqrt'", {"warmup_steps": 100, "decay": "wsd", "cooldown_ratio": 0.2, "cooldown": "1-sqrt"}),
    "decay-one-cycle": ("decay='one_cycle' (cosine warmup from 0.04)", {"warmup_steps": 300, "warmup": "cosine", "warmup_start_factor": 0.04, "decay": "one_cycle", "min_lr": 1e-4}),
}


def draw(name: str, out_dir: Path) -> Path:
    """Plot figure ``name`` of :data:`FIGURES` into ``out_dir/name.png``."""
    title, args = FIGURES[name]
    schedule = WarmupDecaySchedule(**args).resolve(TOTAL)
    steps = list(range(TOTAL + 1))
    fig, ax = plt.subplots(figsize=(4.2, 2.4), dpi=90)
    ax.plot(steps, [schedule.lr(step, 1.0) for step in steps], color="tab:blue", lw=1.6)
    if schedule.warmup_steps:
        ax.axvline(schedule.warmup_steps, color="grey", ls=":", lw=1)
    ax.set(title=title, xlabel="optimizer step", ylabel="LR / base LR", ylim=(-0.03, 1.05), xlim=(0, TOTAL))
    ax.title.set_fontsize(9)
    fig.tight_layout()
    path = out_dir / f"{name}.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def main(out_dir: Path = OUT) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    return [draw(name, out_dir) for name in FIGURES]


if __name__ == "__main__":
    for written in main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT):
        print(written)
