"""Where an MVSA-Single training epoch's time goes on CPU, and what each speed-up buys, measured side by side.

    python benchmarks/mvsa_throughput.py --root data/MVSA_Single [--batches 6] [--threads 2]

Times one batch (``--batch-size`` posts of the training split, the recipe's encoders: EfficientNet-Lite0 at 224
pixels, MiniLM at 64 tokens) for each part of a step, over ``--batches`` batches after one warm-up, in one process:

* decoding and transforming the JPEGs, tokenising;
* the image and the text encoder: forward without gradient (a frozen encoder), forward + backward of the whole encoder,
  forward + backward of the top blocks only (the rest frozen), and the same with the frozen lower blocks' activations
  served from an ``ActivationCache`` (filled in the warm-up: what every epoch of such a stage after its first costs);
* the fusion head on cached features.

It then adds the parts up into the training-epoch time of each way of finetuning (3,609 posts), the ratio to the
recipe's (``recipes/mvsa_single.yaml``), and whether it meets the 5-minute goal. The data loader's workers overlap decoding with the model on a
machine with spare cores; the estimates count decoding in full where the image encoder reads pixels, which is what a
2-core machine sees, and not where its input comes from a cache (the loader still decodes those images).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable

import torch
from gradcheck import median_time  # this folder's scripts share their timer
from PIL import Image

TRAIN_POSTS = 3609


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from ml_optim_plugins import (
        ConcatFusion,
        MVSADataModule,
        SentenceTransformerTextEncoder,
        TimmImageEncoder,
    )
    from ml_optim_plugins.finetuning import ActivationCache, select_parameters, split_point

    data = MVSADataModule(args.root, image_model="tf_efficientnet_lite0", augment=False, batch_size=args.batch_size)
    data.setup("fit")
    dataset = data.datasets["train"]
    rows = list(range(args.batch_size))
    samples = [dataset[i] for i in rows]
    batch = data.collate(samples)
    image = TimmImageEncoder("tf_efficientnet_lite0", pretrained="packaged")
    text = SentenceTransformerTextEncoder("all-MiniLM-L6-v2", max_seq_length=64)
    head = ConcatFusion()
    head.build({"image": image.output_dim, "text": text.output_dim}, 3)
    features = {"image": torch.randn(args.batch_size, image.output_dim), "text": torch.randn(args.batch_size, text.output_dim)}
    labels = batch["label"]

    def decode() -> None:
        for i in rows:
            dataset[i]

    def forward(encoder: torch.nn.Module, inputs: object) -> Callable[[], object]:
        def run() -> None:
            encoder.eval()
            with torch.no_grad():
                encoder(inputs)
        return run

    def train(encoder: torch.nn.Module, inputs: object, selector: str | None) -> Callable[[], object]:
        trainable = None if selector is None else set(select_parameters(encoder, f"encoder{selector}", {"encoder": ""}))

        def run() -> None:
            encoder.train()
            for name, parameter in encoder.named_parameters():
                parameter.requires_grad_(trainable is None or name in trainable)
            encoder(inputs).pow(2).mean().backward()
            encoder.zero_grad(set_to_none=True)
        return run

    def train_cached(encoder: torch.nn.Module, inputs: object, selector: str) -> Callable[[], object]:
        """Forward + backward of the top blocks, the lower ones' activations served from a filled cache."""
        trainable = set(select_parameters(encoder, f"encoder{selector}", {"encoder": ""}))
        block = split_point(encoder, {id(p) for name, p in encoder.named_parameters() if name in trainable})
        cache, ids = ActivationCache(), torch.arange(args.batch_size)

        def step() -> None:
            cache.encode("encoder", encoder, inputs, ids).pow(2).mean().backward()
            encoder.zero_grad(set_to_none=True)

        def run() -> None:
            encoder.train()
            for name, parameter in encoder.named_parameters():
                parameter.requires_grad_(name in trainable)
            for module in encoder.split_blocks()[:block]:
                module.eval()
            if not cache.is_active("encoder"):  # the timer's warm-up: fill the cache (the parts before this one
                cache.activate("encoder", encoder, block)  # changed BatchNorm statistics), then serve and verify
                step()
            step()
        return run

    def fusion_step() -> None:
        loss = torch.nn.functional.cross_entropy(head(features), labels)
        loss.backward()

    parts = {
        "decode + transform (JPEG at full resolution, resize, crop)": decode,
        "tokenise": lambda: data.collate(samples),
        "image encoder forward, no gradient (frozen)": forward(image, batch["image"]),
        "image encoder forward + backward, all blocks": train(image, batch["image"], None),
        "image encoder forward + backward, top 2 blocks": train(image, batch["image"], "[-2:]"),
        "text encoder forward, no gradient (frozen)": forward(text, batch["text"]),
        "text encoder forward + backward, all layers": train(text, batch["text"], None),
        "text encoder forward + backward, top 2 layers": train(text, batch["text"], "[-2:]"),
        "image encoder forward + backward, top 2 blocks, lower ones cached":
            train_cached(image, batch["image"], "[-2:]"),
        "text encoder forward + backward, top 2 layers, lower ones cached": train_cached(text, batch["text"], "[-2:]"),
        "fusion head forward + backward on cached features": fusion_step,
    }
    seconds = {name: median_time(step, args.batches) for name, step in parts.items()}
    print(f"\nper batch of {args.batch_size} posts ({args.threads} threads, median of {args.batches}):\n")
    print("| part | s / batch | ms / post |\n|---|---|---|")
    for name, value in seconds.items():
        print(f"| {name} | {value:.4f} | {1000 * value / args.batch_size:.2f} |")

    s = seconds
    decode_all = s["decode + transform (JPEG at full resolution, resize, crop)"] + s["tokenise"]
    plans = {
        "both encoders finetuned, images decoded each epoch":
            decode_all + s["image encoder forward + backward, all blocks"] + s["text encoder forward + backward, all layers"],
        "image top 2 blocks + all of MiniLM":
            decode_all + s["image encoder forward + backward, top 2 blocks"] + s["text encoder forward + backward, all layers"],
        "image frozen and cached, all of MiniLM finetuned (the recipe)":
            s["tokenise"] + s["text encoder forward + backward, all layers"] + s["fusion head forward + backward on cached features"],
        "image frozen and cached, MiniLM top 2 layers":
            s["tokenise"] + s["text encoder forward + backward, top 2 layers"] + s["fusion head forward + backward on cached features"],
        "image top 2 blocks (lower ones cached) + all of MiniLM":
            s["tokenise"] + s["image encoder forward + backward, top 2 blocks, lower ones cached"]
            + s["text encoder forward + backward, all layers"],
        "image frozen and cached, MiniLM top 2 layers (lower ones cached)":
            s["tokenise"] + s["text encoder forward + backward, top 2 layers, lower ones cached"]
            + s["fusion head forward + backward on cached features"],
        "image top 2 blocks + MiniLM top 2 layers, lower ones of both cached":
            s["tokenise"] + s["image encoder forward + backward, top 2 blocks, lower ones cached"]
            + s["text encoder forward + backward, top 2 layers, lower ones cached"]
            + s["fusion head forward + backward on cached features"],
        "probe stage, both encoders cached (epochs after the first)":
            s["fusion head forward + backward on cached features"],
    }
    batches = math.ceil(TRAIN_POSTS / args.batch_size)
    recipe = plans["image frozen and cached, all of MiniLM finetuned (the recipe)"]
    print(f"\ntraining epoch on MVSA-Single's {TRAIN_POSTS} training posts ({batches} batches), from the parts above:\n")
    print("| way of training | s / batch | min / epoch | x the recipe | <= 5 min |\n|---|---|---|---|---|")
    for name, value in plans.items():
        minutes = value * batches / 60
        print(f"| {name} | {value:.4f} | {minutes:.2f} | {value / recipe:.2f} | {'yes' if minutes <= 5 else 'no'} |")


if __name__ == "__main__":
    Image.init()
    main()
