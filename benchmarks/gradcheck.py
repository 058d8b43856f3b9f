"""Cost of a whole-model gradient check, in training steps: check_gradients on the quick-start model vs one of its
training steps, and torch.autograd.gradcheck (slow mode, element by element) on one small layer vs its step.

Everything is timed in one run, side by side, on the same machine:

    HF_HUB_OFFLINE=1 python benchmarks/gradcheck.py
    HF_HUB_OFFLINE=1 python benchmarks/gradcheck.py --max-samples 4 --directions 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from quickstart_model import quickstart_model

from ml_optim_plugins import SyntheticSentimentDataModule, check_gradients


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-samples", type=int, nargs="+", default=[8, 4, 2], help="samples the check uses")
    parser.add_argument("--directions", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = quickstart_model()
    data = SyntheticSentimentDataModule(batch_size=args.batch_size, max_length=32)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)

    def train_step() -> None:
        optimizer.zero_grad()
        model.training_step(batch, 0).backward()
        optimizer.step()

    step = median_time(train_step, 5)
    parameters = sum(p.numel() for p in model.parameters())
    checks = []
    for samples in args.max_samples:
        start = time.perf_counter()
        report = check_gradients(model, batch, max_samples=samples, directions=args.directions)
        checks.append((samples, report, time.perf_counter() - start))

    layer = torch.nn.Linear(32, 32).double()
    x = torch.randn(16, 32, dtype=torch.float64, requires_grad=True)

    def layer_step() -> None:
        layer(x).pow(2).sum().backward()

    layer_time = median_time(layer_step, 50)
    start = time.perf_counter()
    assert torch.autograd.gradcheck(lambda inp, w, b: torch.nn.functional.linear(inp, w, b),
                                    (x, layer.weight, layer.bias), fast_mode=False)
    slow = time.perf_counter() - start
    layer_elements = x.numel() + layer.weight.numel() + layer.bias.numel()

    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch_size}\n")
    print("| what | elements checked | evaluations | time | one training step | ratio |")
    print("|---|---|---|---|---|---|")
    for samples, report, seconds in checks:
        print(f"| check_gradients, quick-start model ({len(report.tensors)} tensors, {parameters / 1e6:.1f} M "
              f"parameters; {samples} samples, {args.directions} direction(s)) | all tensors | {report.evaluations} "
              f"| {seconds:.1f} s | {step:.2f} s | **{seconds / step:.0f}x** |")
    print(f"| torch.autograd.gradcheck slow mode, one Linear(32, 32) on 16 samples | {layer_elements} "
          f"| {2 * layer_elements} | {slow:.2f} s | {layer_time * 1e3:.2f} ms | **{slow / layer_time:.0f}x** |")
    for samples, report, _ in checks:
        print(f"\n{samples} samples: check passed {report.passed}; non-differentiable tensors "
              f"{len(report.nondifferentiable)}")


if __name__ == "__main__":
    main()
