"""LARS against a per-parameter reference, hand-computed steps, parameter groups, resume."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torchvision.models import resnet18

from ladder_siam.runtime.optim import LARS, NORM_LAYERS, param_groups, scaled_lr


def reference_step(
    params: list[torch.Tensor],
    buffers: list[torch.Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    eta: float,
    lars_exclude: bool,
) -> None:
    """BYOL's LARS written out one tensor at a time, the slow obvious way."""
    with torch.no_grad():
        for param, buffer in zip(params, buffers, strict=True):
            update = param.grad + weight_decay * param
            if not lars_exclude:
                weight_norm = torch.linalg.vector_norm(param)
                update_norm = torch.linalg.vector_norm(update)
                if weight_norm > 0 and update_norm > 0:
                    update = update * (eta * weight_norm / update_norm)
            buffer.mul_(momentum).add_(update)
            param.sub_(lr * buffer)


def head() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(512, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 32, bias=False)
    )


def random_grads(params: list[torch.Tensor], generator: torch.Generator) -> None:
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator, dtype=param.dtype)


def test_scaled_lr_is_the_linear_scaling_rule() -> None:
    assert scaled_lr(0.45, 4096) == pytest.approx(7.2)
    assert scaled_lr(0.2, 256) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="global_batch"):
        scaled_lr(0.45, 0)
    with pytest.raises(ValueError, match="base_lr"):
        scaled_lr(-1.0, 256)


def test_param_groups_exempt_norm_layers_and_biases() -> None:
    model = nn.Sequential(resnet18(), head())
    regular, exempt = param_groups(model, weight_decay=1e-6)
    assert (regular["weight_decay"], regular["lars_exclude"]) == (1e-6, False)
    assert (exempt["weight_decay"], exempt["lars_exclude"]) == (0.0, True)

    exempt_ids = {id(p) for p in exempt["params"]}
    regular_ids = {id(p) for p in regular["params"]}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, NORM_LAYERS) or name == "bias":
                assert id(param) in exempt_ids, (module, name)
            else:
                assert isinstance(module, nn.Conv2d | nn.Linear) and name == "weight"
                assert id(param) in regular_ids, (module, name)
    # resnet18: 20 convolutions, 20 batch norms (weight and bias), fc weight and bias;
    # the head: 2 linear weights, 1 linear bias, 1 batch norm.
    assert len(regular["params"]) == 20 + 1 + 2
    assert len(exempt["params"]) == 40 + 1 + 1 + 2
    assert len(regular_ids | exempt_ids) == len(list(model.parameters()))


def test_param_groups_skip_frozen_dedupe_shared_and_exempt_1d() -> None:
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.LayerNorm(4), shared, nn.GroupNorm(2, 4), nn.Linear(4, 2))
    model.register_parameter("temperature", nn.Parameter(torch.ones(1)))
    model[4].weight.requires_grad_(False)
    regular, exempt = param_groups(model, weight_decay=0.1)
    assert [p.shape for p in regular["params"]] == [(4, 4)]
    assert len(exempt["params"]) == 1 + 2 + 2 + 1 + 1  # bias, LN, GN, temperature, fc bias
    assert any(p is model.temperature for p in exempt["params"])


def test_lars_matches_reference_with_and_without_exclusions() -> None:
    generator = torch.Generator().manual_seed(0)
    model = head()
    options = {"lr": 0.3, "momentum": 0.9, "eta": 1e-3}
    for groups in (param_groups(model, 1e-4), [{"params": list(model.parameters())}]):
        fast = [[p.detach().clone().requires_grad_() for p in g["params"]] for g in groups]
        slow = [[p.detach().clone().requires_grad_() for p in g["params"]] for g in groups]
        weight_decays = [g.get("weight_decay", 1e-4) for g in groups]
        excludes = [g.get("lars_exclude", False) for g in groups]
        optimizer = LARS(
            [{**g, "params": ps} for g, ps in zip(groups, fast, strict=True)],
            weight_decay=1e-4,
            **options,
        )
        buffers = [[torch.zeros_like(p) for p in ps] for ps in slow]
        for _ in range(4):
            state = generator.get_state()
            random_grads([p for ps in fast for p in ps], generator)
            generator.set_state(state)
            random_grads([p for ps in slow for p in ps], generator)
            optimizer.step()
            for ps, bs, wd, exclude in zip(slow, buffers, weight_decays, excludes, strict=True):
                reference_step(ps, bs, weight_decay=wd, lars_exclude=exclude, **options)
        # Not bitwise: the foreach norm reduces in another order than torch.linalg.vector_norm.
        for fast_ps, slow_ps, slow_bs in zip(fast, slow, buffers, strict=True):
            for fast_p, slow_p, slow_b in zip(fast_ps, slow_ps, slow_bs, strict=True):
                torch.testing.assert_close(fast_p, slow_p, rtol=1e-6, atol=1e-7)
                fast_b = optimizer.state[fast_p]["momentum_buffer"]
                torch.testing.assert_close(fast_b, slow_b, rtol=1e-6, atol=1e-7)


def test_trust_ratio_by_hand() -> None:
    weight = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    optimizer = LARS([weight], lr=1.0, momentum=0.9, eta=0.1)
    # ||w|| = 5, ||g|| = 1: ratio 0.1 * 5 / 1 = 0.5, buf = [0.3, 0.4], w = [2.7, 3.6].
    weight.grad = torch.tensor([0.6, 0.8], dtype=torch.float64)
    optimizer.step()
    torch.testing.assert_close(weight.detach(), torch.tensor([2.7, 3.6], dtype=torch.float64))
    # ||w|| = 4.5: ratio 0.45, u = [0.27, 0.36], buf = 0.9 * [0.3, 0.4] + u = [0.54, 0.72].
    optimizer.step()
    torch.testing.assert_close(weight.detach(), torch.tensor([2.16, 2.88], dtype=torch.float64))


def test_weight_decay_enters_before_the_trust_ratio() -> None:
    weight = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    optimizer = LARS([weight], lr=1.0, weight_decay=0.2, eta=0.1)
    # u = g + 0.2 w = [1.2, 1.6], ||u|| = 2: ratio 0.1 * 5 / 2 = 0.25, step [0.3, 0.4].
    weight.grad = torch.tensor([0.6, 0.8], dtype=torch.float64)
    optimizer.step()
    torch.testing.assert_close(weight.detach(), torch.tensor([2.7, 3.6], dtype=torch.float64))


def test_excluded_group_is_sgd_with_momentum() -> None:
    generator = torch.Generator().manual_seed(1)
    lars_params = [nn.Parameter(torch.randn(5, 3, generator=generator)) for _ in range(3)]
    sgd_params = [nn.Parameter(p.detach().clone()) for p in lars_params]
    lars = LARS([{"params": lars_params, "lars_exclude": True}], lr=0.5, weight_decay=0.01)
    sgd = torch.optim.SGD(sgd_params, lr=0.5, momentum=0.9, weight_decay=0.01)
    for _ in range(4):
        grads = [torch.randn(5, 3, generator=generator) for _ in lars_params]
        for lars_p, sgd_p, grad in zip(lars_params, sgd_params, grads, strict=True):
            lars_p.grad, sgd_p.grad = grad.clone(), grad.clone()
        lars.step()
        sgd.step()
    for lars_p, sgd_p in zip(lars_params, sgd_params, strict=True):
        torch.testing.assert_close(lars_p, sgd_p, rtol=1e-6, atol=1e-7)


def test_zero_weights_and_zero_grads_give_finite_steps() -> None:
    zero_weight = nn.Parameter(torch.zeros(4))
    zero_grad = nn.Parameter(torch.ones(4))
    both_zero = nn.Parameter(torch.zeros(4))
    no_grad = nn.Parameter(torch.ones(4))
    decayed = nn.Parameter(torch.full((4,), 2.0))
    plain = [zero_weight, zero_grad, both_zero, no_grad]
    optimizer = LARS([{"params": plain}, {"params": [decayed], "weight_decay": 0.5}], lr=0.1)
    zero_weight.grad = torch.full((4,), 3.0)
    zero_grad.grad = torch.zeros(4)
    both_zero.grad = torch.zeros(4)
    decayed.grad = torch.zeros(4)
    optimizer.step()
    # A zero norm falls back to ratio 1: the zero weight takes the plain gradient step.
    torch.testing.assert_close(zero_weight.detach(), torch.full((4,), -0.3))
    torch.testing.assert_close(zero_grad.detach(), torch.ones(4))
    torch.testing.assert_close(both_zero.detach(), torch.zeros(4))
    torch.testing.assert_close(no_grad.detach(), torch.ones(4))
    assert no_grad not in optimizer.state
    # Decay alone: u = 0.5 w, ratio eta / 0.5, so the step is lr * eta * w.
    torch.testing.assert_close(decayed.detach(), torch.full((4,), 2.0 * (1 - 0.1 * 1e-3)))


def test_resume_from_state_dict_is_bitwise_identical() -> None:
    torch.manual_seed(2)
    inputs, targets = torch.randn(16, 512), torch.randn(16, 32)

    def train(model: nn.Module, optimizer: LARS, steps: int) -> None:
        for _ in range(steps):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(inputs), targets).backward()
            optimizer.step()

    def make(model: nn.Module) -> LARS:
        return LARS(param_groups(model, 1e-6), lr=0.2)

    straight = head()
    resumed = copy.deepcopy(straight)
    train(straight, make(straight), 5)

    optimizer = make(resumed)
    train(resumed, optimizer, 3)
    checkpoint = io.BytesIO()
    torch.save({"model": resumed.state_dict(), "optimizer": optimizer.state_dict()}, checkpoint)
    checkpoint.seek(0)
    saved = torch.load(checkpoint)
    fresh = head()
    fresh.load_state_dict(saved["model"])
    fresh_optimizer = make(fresh)
    fresh_optimizer.load_state_dict(saved["optimizer"])
    train(fresh, fresh_optimizer, 2)

    for name, value in straight.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[name]), name


def test_closure_loss_is_returned() -> None:
    weight = nn.Parameter(torch.ones(3))
    optimizer = LARS([weight], lr=0.1)

    def closure() -> float:
        loss = (weight**2).sum()
        loss.backward()
        return loss.item()

    assert optimizer.step(closure) == pytest.approx(3.0)
    assert optimizer.step() is None


@pytest.mark.parametrize(
    ("option", "value"), [("lr", -0.1), ("momentum", 1.0), ("weight_decay", -1.0), ("eta", 0.0)]
)
def test_invalid_options_name_the_argument(option: str, value: float) -> None:
    options = {"lr": 0.1, option: value}
    with pytest.raises(ValueError, match=option):
        LARS([nn.Parameter(torch.ones(2))], **options)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_step_matches_reference_without_host_sync() -> None:
    generator = torch.Generator().manual_seed(3)
    model = nn.Sequential(resnet18(), head()).cuda()
    groups = param_groups(model, 1e-6)
    reference = [[p.detach().clone() for p in g["params"]] for g in groups]
    buffers = [[torch.zeros_like(p) for p in ps] for ps in reference]
    optimizer = LARS(groups, lr=7.2)
    for step in range(3):
        grads = [torch.randn(p.shape, generator=generator).cuda() for p in model.parameters()]
        for param, grad in zip(model.parameters(), grads, strict=True):
            param.grad = grad
        by_id = {id(p): p.grad for p in model.parameters()}
        for group, ps in zip(groups, reference, strict=True):
            for param, copied in zip(group["params"], ps, strict=True):
                copied.grad = by_id[id(param)].clone()
        # The first step allocates momentum buffers; later ones must not wait for the device.
        torch.cuda.set_sync_debug_mode("error" if step else "default")
        try:
            optimizer.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        for group, ps, bs in zip(groups, reference, buffers, strict=True):
            reference_step(
                ps,
                bs,
                lr=7.2,
                momentum=0.9,
                weight_decay=group["weight_decay"],
                eta=1e-3,
                lars_exclude=group["lars_exclude"],
            )
    for group, ps in zip(groups, reference, strict=True):
        for param, copied in zip(group["params"], ps, strict=True):
            torch.testing.assert_close(param.detach(), copied, rtol=1e-5, atol=1e-6)
