import math

import pytest
import torch

from pipeline.model.adversary import ClassAdversary, adversary_lambda, grad_reverse


@pytest.mark.parametrize("lam", [0.0, 0.3, 2.0])
def test_gradient_reversal_flips_and_scales(lam):
    x = torch.randn(5, 4, requires_grad=True)
    w = torch.randn(4)
    y = grad_reverse(x, lam)
    assert torch.equal(y, x)
    (y * w).sum().backward()
    assert torch.allclose(x.grad, -lam * w.expand(5, 4))


def test_adversary_head_learns_the_class_while_its_input_gets_the_reversed_gradient():
    torch.manual_seed(0)
    head = ClassAdversary(4, 3, hidden=8, dropout=0.0)
    x = torch.randn(6, 4, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    torch.nn.functional.cross_entropy(head(x, 0.5)[0], labels).backward()
    reversed_grad = x.grad.clone()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    x.grad = None
    torch.nn.functional.cross_entropy(head.head(x), labels).backward()
    assert torch.allclose(reversed_grad, -0.5 * x.grad, atol=1e-7)


def test_dann_schedule_ramps_from_zero_to_weight():
    assert adversary_lambda(0.5, "dann", 0.0) == 0.0
    assert math.isclose(adversary_lambda(0.5, "dann", 1.0), 0.5 * (2 / (1 + math.exp(-10)) - 1))
    assert adversary_lambda(0.5, "dann", 0.2) < adversary_lambda(0.5, "dann", 0.5)
    assert adversary_lambda(0.5, "constant", 0.0) == 0.5


def test_warmup_holds_lambda_at_zero_until_the_head_is_above_chance_then_ramps():
    assert adversary_lambda(0.5, "warmup", 0.6, warmup_done_at=None) == 0.0
    assert adversary_lambda(0.5, "warmup", 0.3, warmup_done_at=0.3) == 0.0  # the ramp starts there
    halfway = adversary_lambda(0.5, "warmup", 0.65, warmup_done_at=0.3)
    assert halfway == adversary_lambda(0.5, "dann", 0.5)
    assert adversary_lambda(0.5, "warmup", 1.0, warmup_done_at=0.3) == adversary_lambda(0.5, "dann", 1.0)
