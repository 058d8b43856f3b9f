"""encoder_blocks knows timm, sentence-transformers and generic layer stacks; selectors name blocks and modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ml_optim_plugins import TimmImageEncoder
from ml_optim_plugins.finetuning import encoder_blocks, select_parameters
from ml_optim_plugins.finetuning.blocks import parse_selector
from tests.finetuning.tiny import TinyCNN, TinyLayers, tiny_staged_model


def _every_parameter_once(module: nn.Module, blocks: list[list[str]]) -> None:
    flat = [name for block in blocks for name in block]
    assert sorted(flat) == sorted(name for name, _ in module.named_parameters())
    assert len(flat) == len(set(flat))


@pytest.mark.parametrize(
    ("name", "count", "first", "last"),
    [
        ("resnet10t", 5, "model.conv1.0.weight", "model.layer4.0.conv1.weight"),
        ("test_resnet", 5, "model.conv1.0.weight", "model.layer4.0.conv1.weight"),
        ("mobilenetv3_small_050", 8, "model.conv_stem.weight", "model.conv_head.weight"),
        ("vit_tiny_patch16_224", 13, "model.cls_token", "model.blocks.11.norm1.weight"),
    ],
)
def test_timm_blocks_follow_timms_group_matcher(name, count, first, last):
    encoder = TimmImageEncoder(name)
    blocks = encoder_blocks(encoder)
    assert (len(blocks), blocks[0][0], blocks[-1][0]) == (count, first, last)
    _every_parameter_once(encoder, blocks)


def test_sentence_transformer_blocks_are_embeddings_then_layers():
    from ml_optim_plugins import SentenceTransformerTextEncoder

    encoder = SentenceTransformerTextEncoder("all-MiniLM-L6-v2", max_seq_length=16)
    blocks = encoder_blocks(encoder)
    assert len(blocks) == 7  # embeddings + 6 transformer layers
    assert all("embeddings" in name for name in blocks[0])
    for i, block in enumerate(blocks[1:]):
        assert all(f"encoder.layer.{i}." in name for name in block)
    _every_parameter_once(encoder, blocks)


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        (TinyLayers(), [["embed.weight", "embed.bias"], ["layers.0.0.weight", "layers.0.0.bias"],
                        ["layers.1.0.weight", "layers.1.0.bias"],
                        ["layers.2.0.weight", "layers.2.0.bias", "norm.weight", "norm.bias"]]),
        (TinyCNN(), [["stem.0.weight", "stem.0.bias", "stem.1.weight", "stem.1.bias"],
                     ["block.0.weight", "block.0.bias", "block.1.weight", "block.1.bias"]]),
        (nn.Linear(2, 2), [["weight", "bias"]]),
    ],
)
def test_generic_blocks(module, expected):
    assert encoder_blocks(module) == expected


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("text", 10),
        ("text[-1]", 4),
        ("text[-2:]", 6),
        ("text[:1]", 2),
        ("text[-9:]", 10),  # a slice past the end is cut, as in Python
        ("image[0]", 4),
        ("encoders.text.layers", 6),
        ("encoders.*.embed", 2),
        ("fusion", 2),
    ],
)
def test_select_parameters(selector, expected):
    model = tiny_staged_model()
    modalities = {"image": "encoders.image", "text": "encoders.text"}
    assert len(select_parameters(model, selector, modalities)) == expected


@pytest.mark.parametrize(
    ("selector", "message"),
    [
        ("text[7]", "block 7 out of range; encoders.text has 4 blocks"),
        ("audio", "matches no parameter"),
        ("enc*[-1]", "block indices need one of them"),
        ("text[1:1]", "selects no block"),
        ("text[x]", "bad module selector"),
    ],
)
def test_bad_selectors_name_the_problem(selector, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        select_parameters(tiny_staged_model(), selector, {"image": "encoders.image", "text": "encoders.text"})


def test_parse_selector():
    assert parse_selector(" text [ -2 : ] ") == ("text", slice(-2, None))
    assert parse_selector("image[3]") == ("image", 3)
    with pytest.raises(ValueError, match="empty block index"):
        parse_selector("image[]")


class Wrapper(torch.nn.Module):
    """An encoder of one's own around a layered model, declaring it through the contract's ModelWrapper."""

    def __init__(self, inner=None):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.backbone = TinyLayers()
        self._returned = [inner]  # in a list: not registered as a sub-module

    def wrapped_model(self):
        return self.backbone if self._returned[0] is None else self._returned[0]


def test_an_encoder_declaring_its_wrapped_model_gets_that_models_blocks():
    blocks = encoder_blocks(Wrapper())
    inner = [[f"backbone.{name}" for name in block] for block in encoder_blocks(TinyLayers())]
    assert blocks == inner[:-1] + [inner[-1] + ["proj.weight", "proj.bias"]]  # its own parameters join the top block
    with pytest.raises(ValueError, match="wrapped_model\\(\\) returned Linear, which is not one of its sub-modules"):
        encoder_blocks(Wrapper(inner=torch.nn.Linear(2, 2)))
