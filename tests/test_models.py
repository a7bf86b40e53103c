"""The Ladder Siamese model: stages, heads, target EMA and torchvision-compatible export."""

from __future__ import annotations

import pytest
import torch
import torchvision

from ladder_siam.nets.archs import ARCHS, STAGES
from ladder_siam.nets.backbones import ResNetStages, torchvision_resnet
from ladder_siam.pretrain.levels import parse_levels
from ladder_siam.pretrain.model import LadderSiam

CHANNELS = {
    "resnet18": [64, 128, 256, 512],
    "resnet34": [64, 128, 256, 512],
    "resnet50": [256, 512, 1024, 2048],
    "resnet101": [256, 512, 1024, 2048],
}


@pytest.mark.parametrize("arch", ARCHS)
def test_heads_match_each_stage(arch: str) -> None:
    # On the meta device: shapes without weights or arithmetic, so a ResNet-101 takes ms.
    with torch.device("meta"):
        model = LadderSiam(arch, "DDGG", hidden_dim=32, projection_dim=16, dense_dim=8)
        encoding = model.online(torch.empty(2, 3, 64, 64))
        reference = torchvision.models.get_model(arch)
        exported = model.backbone_state_dict()
    for stage, channels in zip(STAGES, CHANNELS[arch], strict=True):
        assert model.online.projectors[stage][0].in_features == channels
        assert model.predictors[stage][0].in_features == 16
        assert encoding.pooled[stage].shape == (2, channels)
        assert encoding.stages[stage].projection.shape == (2, 16)
    assert set(model.online.dense_projectors) == {"res2", "res3"}
    assert model.online.dense_projectors["res2"][0].in_channels == CHANNELS[arch][0]
    assert encoding.stages["res2"].dense.shape == (2, 8, 16, 16)
    assert encoding.stages["res3"].dense.shape == (2, 8, 8, 8)
    assert encoding.stages["res4"].dense is None
    # The export loads strictly into torchvision's own model: the same names and shapes.
    reference.load_state_dict(exported)


@pytest.mark.parametrize("small_input", [False, True])
def test_exported_backbone_computes_what_the_online_backbone_computes(small_input: bool) -> None:
    model = LadderSiam(
        "resnet18", "GGGG", hidden_dim=32, projection_dim=16, small_input=small_input
    )
    reference = torchvision_resnet("resnet18", small_input)
    reference.load_state_dict(model.backbone_state_dict())
    reference.fc = torch.nn.Identity()
    model.eval(), reference.eval()
    images = torch.randn(2, 3, 32, 32)
    pooled = model.online.backbone(images)["res5"].mean(dim=(2, 3))
    assert torch.allclose(reference(images), pooled, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_stage_resolutions_for_small_and_standard_stems(arch: str) -> None:
    with torch.device("meta"):
        standard = ResNetStages(arch)(torch.empty(1, 3, 64, 64))
        small = ResNetStages(arch, small_input=True)(torch.empty(1, 3, 32, 32))
    assert [tuple(standard[s].shape[1:]) for s in standard] == [
        (c, r, r) for c, r in zip(CHANNELS[arch], (16, 8, 4, 2), strict=True)
    ]
    assert [tuple(small[s].shape[1:]) for s in small] == [
        (c, r, r) for c, r in zip(CHANNELS[arch], (32, 16, 8, 4), strict=True)
    ]


def test_methods_and_level_strings() -> None:
    assert parse_levels("byol") == "---G"
    assert parse_levels("ladder-dense-byol") == "DDGG"
    assert parse_levels("DG-G") == "DG-G"
    for bad in ("GGG", "GGGX", "GGG-", "simclr"):
        with pytest.raises(ValueError, match="expected one of"):
            parse_levels(bad)


def _tiny(levels: str) -> LadderSiam:
    torch.manual_seed(0)
    return LadderSiam(
        "resnet18", levels, small_input=True, hidden_dim=32, projection_dim=16, dense_dim=8
    )


@pytest.mark.parametrize("levels", ["---G", "GGGG", "---D", "DDGG"])
def test_forward_reports_every_supervised_level_and_weights_them(levels: str) -> None:
    model = _tiny(levels)
    output = model(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    supervised = [
        s for s, kind in zip(("res2", "res3", "res4", "res5"), levels, strict=True) if kind != "-"
    ]
    assert list(output.per_level) == supervised == list(output.output_std)
    weights = dict(zip(("res2", "res3", "res4", "res5"), model.weights, strict=True))
    expected = sum(weights[s] * output.per_level[s] for s in supervised)
    assert output.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    output.loss.backward()
    assert all(p.grad is None for p in model.target.parameters()), "the target gets no gradient"
    assert model.online.backbone.conv1.weight.grad is not None


def test_unsupervised_stages_have_no_heads() -> None:
    model = _tiny("---G")
    assert set(model.online.projectors) == {"res5"} and not model.online.dense_projectors


def test_target_follows_the_online_network_by_ema() -> None:
    model = _tiny("GGGG")
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter))
    online = [p.clone() for p in model.online.parameters()]
    before = [p.clone() for p in model.target.parameters()]
    model.update_target(0.9)
    for target, old, new in zip(model.target.parameters(), before, online, strict=True):
        assert torch.allclose(target, 0.9 * old + 0.1 * new, atol=1e-6)
    model.update_target(0.0)
    assert all(torch.equal(t, o) for t, o in zip(model.target.parameters(), online, strict=True))


def test_bad_weights_are_rejected() -> None:
    with pytest.raises(ValueError, match="weights"):
        LadderSiam("resnet18", "GGGG", weights=[1.0, 1.0], hidden_dim=8, projection_dim=8)
