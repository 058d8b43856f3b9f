from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from ml_optim_plugins import ConcatFusion, ModalityAware, ModalityAwareMixin
from ml_optim_plugins.multimodal import require_modality_aware


class UsersOwnModule(pl.LightningModule):
    """A module that implements the contract by hand, without our mixin."""

    def __init__(self) -> None:
        super().__init__()
        self.vision, self.language = nn.Linear(4, 3), nn.Linear(6, 3)
        self.modality_logits: dict[str, torch.Tensor] = {}
        self.modality_targets = None

    def modality_encoders(self):
        return {"image": self.vision, "text": self.language}


class MixinModule(ModalityAwareMixin, nn.Module):
    def __init__(self, fusion=None) -> None:
        super().__init__()
        self.encoders = nn.ModuleDict({"a": nn.Linear(4, 3), "b": nn.Linear(5, 2)})
        self.fusion = fusion or ConcatFusion(in_dims={"a": 3, "b": 2}, num_classes=4)


def test_protocol_recognises_hand_written_and_mixin_modules(tiny_model):
    for module in (UsersOwnModule(), MixinModule(), tiny_model):
        assert isinstance(module, ModalityAware)
        assert require_modality_aware(module, "Test") is module
    assert not isinstance(nn.Linear(2, 2), ModalityAware)


def test_missing_contract_names_what_to_implement():
    with pytest.raises(TypeError) as info:
        require_modality_aware(nn.Linear(2, 2), "ModalityBalancer")
    message = str(info.value)
    assert "ModalityBalancer" in message and "Linear lacks modality_encoders()" in message
    assert "ModalityAwareMixin" in message


@pytest.mark.parametrize(
    ("encoders", "match"),
    [({}, "non-empty mapping"), ({"image": "resnet"}, "must be nn.Module")],
)
def test_bad_modality_encoders_are_rejected(encoders, match):
    module = UsersOwnModule()
    module.modality_encoders = lambda: encoders
    with pytest.raises(TypeError, match=match):
        require_modality_aware(module, "Test")


def test_mixin_records_detached_logits_and_targets():
    module = MixinModule()
    assert module.modality_logits == {} and module.modality_targets is None
    feats = {"a": module.encoders["a"](torch.randn(6, 4)), "b": module.encoders["b"](torch.randn(6, 5))}
    targets = torch.arange(6) % 4
    module.record_modality_outputs(feats, targets)
    assert set(module.modality_logits) == {"a", "b"}
    assert all(not t.requires_grad and t.shape == (6, 4) for t in module.modality_logits.values())
    torch.testing.assert_close(sum(module.modality_logits.values()), module.fusion(feats).detach())
    assert torch.equal(module.modality_targets, targets)
    assert dict(module.modality_encoders()) == dict(module.encoders.items())


def test_mixin_with_a_plain_linear_head_names_what_to_implement():
    module = MixinModule(fusion=nn.Linear(5, 4))
    with pytest.raises(TypeError, match=r"ModalityBalancer: .* has fusion = Linear, not an ml_optim_plugins Fusion"
                                        r".*override modality_outputs"):
        require_modality_aware(module, "ModalityBalancer")  # at a callback's setup (issue 17)
    feats = {"a": torch.randn(2, 3), "b": torch.randn(2, 2)}
    with pytest.raises(TypeError, match="ModalityAware protocol yourself"):
        module.record_modality_outputs(feats, torch.zeros(2, dtype=torch.long))


def test_mixin_with_its_own_modality_outputs_needs_no_library_fusion():
    class OwnHeads(MixinModule):
        def modality_outputs(self, features):
            return {name: torch.zeros(len(f), 4) for name, f in features.items()}

    module = OwnHeads(fusion=nn.Linear(5, 4))
    assert require_modality_aware(module, "Test") is module
    module.record_modality_outputs({"a": torch.randn(2, 3), "b": torch.randn(2, 2)}, torch.zeros(2, dtype=torch.long))
    assert module.modality_logits["b"].shape == (2, 4)
