"""The losses against hand-computed values and their defining properties."""

from __future__ import annotations

import math

import pytest
import torch

from ladder_siam.pretrain import losses
from ladder_siam.pretrain.levels import ladder_weights
from ladder_siam.pretrain.losses import (
    byol_loss,
    dense_byol_loss,
    match_positions,
    output_std,
)


def test_byol_loss_hand_computed() -> None:
    prediction = torch.tensor([[1.0, 0.0], [3.0, 3.0], [1.0, 0.0]])
    target = torch.tensor([[0.0, 5.0], [2.0, 2.0], [1.0, 1.0]])
    expected = (2.0 + 0.0 + (2 - 2 / math.sqrt(2))) / 3
    assert byol_loss(prediction, target).item() == pytest.approx(expected, abs=1e-6)


def test_byol_loss_is_symmetric_and_zero_for_identical_inputs() -> None:
    a, b = torch.randn(16, 8), torch.randn(16, 8)
    assert byol_loss(a, b).item() == pytest.approx(byol_loss(b, a).item(), abs=1e-6)
    assert byol_loss(a, 3 * a).item() == pytest.approx(0.0, abs=1e-6)
    assert 0.0 <= byol_loss(a, b).item() <= 4.0


def test_byol_gradient_flows_only_through_the_prediction() -> None:
    prediction = torch.randn(4, 8, requires_grad=True)
    target = torch.randn(4, 8, requires_grad=True)
    byol_loss(prediction, target).backward()
    assert prediction.grad is not None and prediction.grad.abs().sum() > 0
    assert target.grad is None


def _shuffled_target(
    online: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A target map whose positions are a known permutation of the online map's."""
    n, c, h, w = online.shape
    permutation = torch.stack([torch.randperm(h * w, generator=generator) for _ in range(n)])
    flat = online.flatten(2)
    target = torch.stack([flat[i][:, permutation[i]] for i in range(n)]).reshape(n, c, h, w)
    # online position p sits at target position inverse[p]
    inverse = torch.argsort(permutation, dim=1)
    return 2.5 * target, inverse


def test_dense_matching_finds_the_known_correspondence() -> None:
    generator = torch.Generator().manual_seed(0)
    online = torch.randn(3, 16, 5, 6, generator=generator)
    target, inverse = _shuffled_target(online, generator)
    assert torch.equal(match_positions(online, target), inverse)


def test_dense_loss_on_a_constructed_example() -> None:
    generator = torch.Generator().manual_seed(1)
    online = torch.randn(2, 8, 4, 4, generator=generator)
    target, inverse = _shuffled_target(online, generator)
    assert dense_byol_loss(online, online, target).item() == pytest.approx(0.0, abs=1e-6)

    prediction = torch.randn(2, 8, 4, 4, generator=generator)
    aligned = torch.stack([target.flatten(2)[i][:, inverse[i]] for i in range(2)])
    manual = byol_loss(
        prediction.flatten(2).transpose(1, 2).reshape(-1, 8), aligned.transpose(1, 2).reshape(-1, 8)
    )
    assert dense_byol_loss(prediction, online, target).item() == pytest.approx(
        manual.item(), abs=1e-6
    )


def test_dense_target_map_may_have_another_size() -> None:
    online = torch.randn(2, 8, 6, 6)
    target = torch.nn.functional.interpolate(online, size=(3, 3), mode="area")
    loss = dense_byol_loss(online, online, target)
    assert loss.shape == () and 0 <= loss.item() < 2


def test_dense_matching_in_chunks_equals_one_shot(monkeypatch: pytest.MonkeyPatch) -> None:
    online, target = torch.randn(7, 8, 6, 6), torch.randn(7, 8, 6, 6)
    whole = match_positions(online, target)
    monkeypatch.setattr(losses, "DENSE_CHUNK_ELEMENTS", 36 * 36 * 2)  # two images per chunk
    assert torch.equal(match_positions(online, target), whole)


def test_dense_gradient_reaches_only_the_prediction() -> None:
    prediction = torch.randn(2, 8, 3, 3, requires_grad=True)
    online = torch.randn(2, 8, 3, 3, requires_grad=True)
    target = torch.randn(2, 8, 3, 3, requires_grad=True)
    dense_byol_loss(prediction, online, target).backward()
    assert prediction.grad is not None
    assert online.grad is None and target.grad is None


def test_ladder_weights_follow_eq_6() -> None:
    assert ladder_weights() == [1 / 16, 1 / 8, 1 / 4, 1.0]
    assert ladder_weights(1.0, 3) == [1 / 4, 1 / 2, 1.0]
    assert ladder_weights(0.5, 1) == [1.0]
    with pytest.raises(ValueError, match="levels"):
        ladder_weights(0.5, 0)


def test_output_std_is_zero_when_collapsed() -> None:
    assert output_std(torch.ones(64, 32)).item() == pytest.approx(0.0, abs=1e-6)
    spread = output_std(torch.randn(4096, 64)).item()
    assert spread == pytest.approx(1 / math.sqrt(64), rel=0.05)
    assert output_std(torch.randn(8, 64, 4, 4)).item() == pytest.approx(1 / math.sqrt(64), rel=0.1)
