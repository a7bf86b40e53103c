"""The model's typed outputs and its checkpoint layout: one online encoder, its deep-copied
target, and checkpoints written before the encoder was one module still resuming."""

from __future__ import annotations

import torch

from ladder_siam.pretrain.model import LEGACY_PREFIXES, LadderSiam, StageOutput
from ladder_siam.runtime import checkpoint, resume
from ladder_siam.runtime.checkpoint import Checkpoint


def tiny(levels: str = "-GGD") -> LadderSiam:
    return LadderSiam("resnet18", levels, hidden_dim=16, projection_dim=8, small_input=True)


def as_written_before(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict in the layout of checkpoints from before the ``Encoder`` module."""
    old = {new: prefix for prefix, new in LEGACY_PREFIXES.items()}
    renamed = {}
    for key, value in state.items():
        new = next((n for n in old if key.startswith(n)), None)
        renamed[old[new] + key.removeprefix(new) if new else key] = value
    return renamed


def test_a_checkpoint_of_the_old_layout_resumes_into_the_same_model() -> None:
    torch.manual_seed(0)
    trained = tiny()
    trained.update_target(0.5)  # target differs from a fresh copy of the online side
    legacy = as_written_before(trained.state_dict())
    assert any(key.startswith("backbone.") for key in legacy)
    assert not any(key.startswith("online.") for key in legacy)

    torch.manual_seed(1)
    resumed = tiny()
    resume.restore(
        Checkpoint(10, {"model": legacy, "rng": checkpoint.rng_state()}), {"model": resumed}
    )
    for key, tensor in trained.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], tensor), key
    # The exported backbone keeps torchvision's keys, whichever layout it was resumed from.
    assert resumed.backbone_state_dict().keys() == trained.backbone_state_dict().keys()
    assert "conv1.weight" in resumed.backbone_state_dict()


def test_each_stage_output_is_named_and_only_dense_stages_have_a_map() -> None:
    model = tiny("-GGD")
    encoding = model.online(torch.randn(2, 3, 32, 32))
    assert list(encoding.stages) == ["res3", "res4", "res5"]
    assert list(encoding.pooled) == ["res2", "res3", "res4", "res5"]
    res4, res5 = encoding.stages["res4"], encoding.stages["res5"]
    assert isinstance(res5, StageOutput)
    assert res4.dense is None and res4.projection.shape == (2, 8)
    assert res5.dense is not None and res5.dense.shape[:2] == (2, 128)  # DenseCL's width


def test_the_target_is_a_frozen_copy_that_the_ema_pairs_by_structure() -> None:
    model = tiny()
    online, target = dict(model.online.named_parameters()), dict(model.target.named_parameters())
    assert online.keys() == target.keys()
    assert not any(p.requires_grad for p in target.values())
    with torch.no_grad():
        for parameter in online.values():
            parameter.add_(1.0)
    model.update_target(0.75)
    for name, parameter in online.items():
        # target <- 0.75 target + 0.25 online, with target = online - 1 before the step
        expected = 0.75 * (parameter - 1.0) + 0.25 * parameter
        torch.testing.assert_close(target[name], expected, msg=name)
