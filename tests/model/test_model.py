import math

import pytest
import torch

from pipeline.config import Config
from pipeline.model.adversary import ClassAdversary, adversary_lambda, grad_reverse
from pipeline.model.attention import TapPooling
from pipeline.model.backbone import Backbone, check_taps
from pipeline.model.embedder import Embedder


def _model_cfg(attention=True, adversary=True, **att):
    cfg = Config().model
    return cfg.model_copy(update={
        "embedding_size": 16,
        "attention": cfg.attention.model_copy(update={"enabled": attention, "width": 8, **att}),
        "adversary": cfg.adversary.model_copy(update={"enabled": adversary, "hidden": 16}),
    })


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_tap_widths_and_strides_are_read_from_the_model(backbone):
    net = Backbone(backbone, ["layer2", "layer3"], probe_size=64)
    expansion = 4 if backbone == "resnet50" else 1
    assert net.info["layer2"].channels == 128 * expansion and net.info["layer2"].reduction == 8
    assert net.info["layer3"].channels == 256 * expansion and net.info["layer3"].reduction == 16
    assert net.info["last"].channels == 512 * expansion and net.info["last"].reduction == 32


def test_unknown_tap_lists_valid_names():
    msg = check_taps("resnet18", ["layer2", "block7"])
    assert "'block7' is not a layer of resnet18" in msg and "layer1, layer2" in msg
    assert check_taps("resnet18", ["layer1", "layer3.1.relu_1"]) is None


@pytest.mark.parametrize("kind", ["additive", "avg"])
def test_embedder_outputs_unit_embeddings_and_adversary_logits(kind):
    model = Embedder(_model_cfg(kind=kind), num_train_classes=5, image_size=32)
    emb, logits = model(torch.randn(6, 3, 32, 32), lam=0.5)
    assert emb.shape == (6, 16)
    assert torch.allclose(emb.norm(dim=1), torch.ones(6), atol=1e-5)
    assert logits.shape == (6, 5)
    model.eval()
    assert model(torch.randn(2, 3, 32, 32))[1] is None  # no adversary at inference


def test_baseline_has_neither_attention_nor_adversary():
    model = Embedder(_model_cfg(attention=False, adversary=False), num_train_classes=5, image_size=32)
    assert model.pool is None and model.adversary is None
    assert model.embed.in_features == 512
    emb, logits = model(torch.randn(4, 3, 32, 32))
    assert logits is None and emb.shape == (4, 16)


def test_additive_attention_weights_are_a_distribution_over_positions():
    pool = TapPooling({"a": 4, "b": 6}, last_channels=10, width=8, kind="additive")
    out = pool({"a": torch.randn(3, 4, 8, 8), "b": torch.randn(3, 6, 4, 4)}, torch.randn(3, 10, 2, 2))
    assert out.shape == (3, 16)
    for tap, n in (("a", 64), ("b", 16)):
        w = pool.last_weights[tap]
        assert w.shape == (3, n)
        assert torch.allclose(w.sum(dim=1), torch.ones(3))


@pytest.mark.parametrize("lam", [0.0, 0.3, 2.0])
def test_gradient_reversal_flips_and_scales(lam):
    x = torch.randn(5, 4, requires_grad=True)
    w = torch.randn(4)
    (grad_reverse(x, lam) * w).sum().backward()
    assert torch.allclose(x.grad, -lam * w.expand(5, 4))


def test_zero_lambda_leaves_backbone_gradient_equal_to_baseline():
    torch.manual_seed(0)
    model = Embedder(_model_cfg(), num_train_classes=5, image_size=32)
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 0, 1, 1, 2, 2])
    model.eval()  # fixed BatchNorm statistics: identical forward passes

    def backbone_grad(with_adversary):
        model.zero_grad()
        emb, _ = model(x)
        loss = emb.pow(2).sum() * 0 + emb[:, 0].sum()
        if with_adversary:
            logits = model.adversary(model.features(x), 0.0)
            loss = loss + torch.nn.functional.cross_entropy(logits, y)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.backbone.parameters()])

    assert torch.allclose(backbone_grad(False), backbone_grad(True), atol=1e-7)


def test_adversary_head_still_learns_the_class():
    head = ClassAdversary(4, 3, hidden=8, dropout=0.0)
    x = torch.randn(6, 4, requires_grad=True)
    torch.nn.functional.cross_entropy(head(x, 1.0), torch.tensor([0, 1, 2, 0, 1, 2])).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_dann_schedule_ramps_from_zero_to_weight():
    assert adversary_lambda(0.5, "dann", 0.0) == 0.0
    assert math.isclose(adversary_lambda(0.5, "dann", 1.0), 0.5 * (2 / (1 + math.exp(-10)) - 1))
    assert adversary_lambda(0.5, "dann", 0.2) < adversary_lambda(0.5, "dann", 0.5)
    assert adversary_lambda(0.5, "constant", 0.0) == 0.5
