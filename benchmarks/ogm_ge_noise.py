"""Cost of OGM-GE's gradient modulation per optimizer step on the quick-start encoders' weight gradients.

Times, side by side in one process (median of ``--repeats``): scaling the gradients only (OGM without enhancement),
drawing the Gaussian noise only, and the balancer's full OGM-GE loop (``modulate_with_noise`` plus the norms it logs).
The gradients are random tensors shaped like every >= 2-D parameter of resnet10t + MiniLM (the tensors ``ModalityBalancer``
modulates by default).

    python benchmarks/ogm_ge_noise.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from quickstart_model import quickstart_model

from ml_optim_plugins.balancing.ogm_ge import modulate_with_noise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    grads = [torch.randn_like(p) for p in quickstart_model().encoders.parameters() if p.ndim >= 2]

    def scale_only() -> None:
        for g in grads:
            g * 0.5

    def noise_only() -> None:
        generator = torch.Generator().manual_seed(0)
        for g in grads:
            torch.randn(g.shape, generator=generator)

    def ogm_ge_loop() -> None:  # what ModalityBalancer does per step for method="ogm_ge"
        generator, squares = torch.Generator().manual_seed(0), torch.zeros(3)
        for g in grads:
            new, noise = modulate_with_noise(g, 0.5, True, generator)
            squares[0] += torch.linalg.vector_norm(g, dtype=torch.float32).square()
            squares[1] += torch.linalg.vector_norm(new, dtype=torch.float32).square()
            squares[2] += torch.linalg.vector_norm(noise, dtype=torch.float32).square()

    times: dict[str, list[float]] = {f.__name__: [] for f in (scale_only, noise_only, ogm_ge_loop)}
    for _ in range(args.repeats):
        for f in (scale_only, noise_only, ogm_ge_loop):
            start = time.perf_counter()
            f()
            times[f.__name__].append(time.perf_counter() - start)
    numbers = sum(g.numel() for g in grads) / 1e6
    print(f"{len(grads)} gradient tensors, {numbers:.1f} M numbers; median of {args.repeats}")
    print("| work per step | ms | ratio to the full loop |")
    print("|---|---|---|")
    full = statistics.median(times["ogm_ge_loop"])
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values) * 1e3:.0f} | {statistics.median(values) / full:.2f} |")


if __name__ == "__main__":
    main()
