"""Forward + backward time, and memory kept for backward, of GaussianDropout vs nn.Dropout on realistic sizes.

All variants are timed side by side in one run with torch.utils.benchmark (interleaved, median of adaptive runs), so
the ratios hold even on a shared, noisy machine. "saved" is what autograd keeps between forward and backward for the
layer (measured with saved-tensor hooks): nn.Dropout keeps a 1-byte mask per element, Gaussian dropout the noise in
the input's dtype.

    python benchmarks/dropout.py                       # CPU, 2 threads
    python benchmarks/dropout.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils import benchmark

from ml_optim_plugins import GaussianDropout

# name -> (shape, dims along which the shared-noise variant shares)
SHAPES = {
    "MiniLM hidden states (32, 128, 384)": ((32, 128, 384), (-1,)),
    "CNN feature maps (32, 64, 56, 56)": ((32, 64, 56, 56), (2, 3)),
    "MLP activations (256, 4096)": ((256, 4096), (0,)),
    "fusion features (32, 896)": ((32, 896), (0,)),
}


def saved_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for the backward of ``layer(x)``."""
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return total


def forward_backward(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    layer(x).backward(grad)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per measurement")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"device {args.device}, dtype {args.dtype}, p={args.p}, torch {torch.__version__}, {args.threads} threads\n")
    print(f"| tensor | nn.Dropout ms | GaussianDropout ms | ratio | shared-noise Gaussian ms | ratio | saved bytes Gaussian / Dropout |")
    print("|---|---|---|---|---|---|---|")
    for name, (shape, shared) in SHAPES.items():
        x = torch.randn(shape, device=args.device, dtype=dtype, requires_grad=True)
        grad = torch.randn_like(x)
        layers = {
            "dropout": nn.Dropout(args.p),
            "gaussian": GaussianDropout(args.p),
            "shared": GaussianDropout(args.p, shared_dims=shared),
        }
        times = {}
        for label, layer in layers.items():
            timer = benchmark.Timer(
                stmt="forward_backward(layer, x, grad)",
                globals={"forward_backward": forward_backward, "layer": layer.train(), "x": x, "grad": grad},
                num_threads=args.threads,
            )
            times[label] = timer.adaptive_autorange(min_run_time=args.min_run_time).median * 1e3
        memory = saved_bytes(layers["gaussian"], x) / saved_bytes(layers["dropout"], x)
        print(
            f"| {name} | {times['dropout']:.2f} | {times['gaussian']:.2f} | {times['gaussian'] / times['dropout']:.2f} "
            f"| {times['shared']:.2f} | {times['shared'] / times['dropout']:.2f} | {memory:.1f} |"
        )


if __name__ == "__main__":
    main()
