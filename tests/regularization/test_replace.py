"""replace_dropout on a timm model and on MiniLM, then undone; layers whose rate is read but never called."""

from __future__ import annotations

import pytest
import timm
import torch

from ml_optim_plugins import GaussianDropout, SentenceTransformerTextEncoder, replace_dropout


def dropout_types(model: torch.nn.Module) -> dict[str, str]:
    return {name: type(m).__name__ for name, m in model.named_modules() if "Dropout" in type(m).__name__}


def test_timm_vit_swapped_with_same_rates_and_undone():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, drop_rate=0.1, proj_drop_rate=0.1,
                              attn_drop_rate=0.05, depth=2)
    before = {name: m for name, m in model.named_modules()}
    replaced = replace_dropout(model)
    assert len(replaced) == 2 * 4 + 2  # per block: attn_drop, proj_drop, mlp.drop1, mlp.drop2; pos_drop, head_drop
    assert set(dropout_types(model).values()) == {"GaussianDropout"}
    for name in replaced.names:
        assert model.get_submodule(name).p == before[name].p
    model.train()
    not_called = replaced.not_called(lambda: model(torch.randn(2, 3, 224, 224)))
    # timm's fused attention reads attn_drop.p and applies dropout inside scaled_dot_product_attention
    assert not_called == ([f"blocks.{i}.attn.attn_drop" for i in range(2)] if model.blocks[0].attn.fused_attn else [])
    names = replaced.names
    replaced.undo()
    assert replaced.names == [] and all(model.get_submodule(name) is before[name] for name in names)
    assert set(dropout_types(model).values()) == {"Dropout"}


def test_minilm_hidden_dropouts_swapped_and_undone_with_a_context_manager():
    encoder = SentenceTransformerTextEncoder("all-MiniLM-L6-v2", max_seq_length=16)
    originals = {name: m for name, m in encoder.named_modules() if type(m) is torch.nn.Dropout}
    batch = encoder.tokenize(["a fine day", "not good at all"])
    with replace_dropout(encoder, exclude=["*.attention.self.dropout"]) as replaced:
        # embeddings + per layer: attention.output.dropout and output.dropout (6 layers); attention probs excluded
        assert len(replaced) == 1 + 6 * 2
        assert all(".attention.self." not in name for name in replaced.names)
        encoder.train()
        assert replaced.not_called(lambda: encoder(batch)) == []
        torch.manual_seed(0)
        first = encoder(batch)
        torch.manual_seed(1)
        assert not torch.allclose(first, encoder(batch))  # Gaussian noise in training
        assert all(isinstance(encoder.get_submodule(n), GaussianDropout) for n in replaced.names)
    assert {name: m for name, m in encoder.named_modules() if type(m) is torch.nn.Dropout} == originals


def test_minilm_attention_dropout_is_read_not_called():
    encoder = SentenceTransformerTextEncoder("all-MiniLM-L6-v2", max_seq_length=16).train()
    replaced = replace_dropout(encoder)
    not_called = replaced.not_called(lambda: encoder(encoder.tokenize(["hello"])))
    assert len(not_called) == 6 and all(name.endswith("attention.self.dropout") for name in not_called)
    replaced.undo()


def test_other_types_with_a_custom_factory():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Dropout2d(0.2), torch.nn.Dropout(0.3))
    replaced = replace_dropout(model, factory=lambda p: GaussianDropout(p, shared_dims=(2, 3)), types=(torch.nn.Dropout2d,))
    assert replaced.names == ["1"] and model[1].shared_dims == (2, 3) and model[1].p == 0.2
    assert type(model[2]) is torch.nn.Dropout


@pytest.mark.parametrize("training", [True, False])
def test_replacement_keeps_the_train_or_eval_mode(training):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.1)).train(training)
    replace_dropout(model)
    assert model[1].training is training


def test_a_layer_shared_by_two_parents_is_replaced_in_both_and_restored():
    shared = torch.nn.Dropout(0.2)
    model = torch.nn.ModuleDict({"a": torch.nn.Sequential(torch.nn.Linear(2, 2), shared), "b": torch.nn.Sequential(shared)})
    replaced = replace_dropout(model)
    assert replaced.names == ["a.1", "b.0"] and model["a"][1] is model["b"][0]
    assert isinstance(model["b"][0], GaussianDropout)
    replaced.undo()
    assert model["a"][1] is shared and model["b"][0] is shared
