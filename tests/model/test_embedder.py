import pytest
import torch

from pipeline.config import Config
from pipeline.model.backbone import BACKBONES
from pipeline.model.embedder import Embedder


def model_cfg(backbone="resnet18", attention=True, adversary=True, fusion="concat", adv_input="features", **att):
    cfg = Config().model
    return cfg.model_copy(update={
        "backbone": backbone,
        "embedding_size": 16,
        "fusion": fusion,
        "attention": cfg.attention.model_copy(update={"enabled": attention, "width": 8, **att}),
        "adversary": cfg.adversary.model_copy(update={"enabled": adversary, "hidden": 16, "input": adv_input}),
    })


@pytest.mark.parametrize("backbone", [*sorted(BACKBONES), "timm/test_resnet", "timm/test_vit"])
@pytest.mark.parametrize("kind", ["additive", "cbam", "avg"])
def test_every_backbone_and_attention_kind_gives_unit_embeddings(backbone, kind):
    model = Embedder(model_cfg(backbone, kind=kind), num_train_classes=5, image_size=64)
    emb, adversarial = model(torch.randn(2, 3, 64, 64), lam=0.5)
    assert emb.shape == (2, 16)
    assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
    assert adversarial.logits.shape == (2, 5)
    model.eval()
    assert model(torch.randn(2, 3, 64, 64))[1] is None  # no adversary at inference


@pytest.mark.parametrize("fusion", ["concat", "sum"])
@pytest.mark.parametrize("adv_input", ["features", "embedding"])
def test_fusion_and_adversary_input(fusion, adv_input):
    model = Embedder(model_cfg(fusion=fusion, adv_input=adv_input, taps=["layer1", "layer3"]), 7, image_size=32)
    emb, adversarial = model(torch.randn(3, 3, 32, 32), 0.1)
    assert emb.shape == (3, 16) and adversarial.logits.shape == (3, 7)
    expected_in = 512 + 2 * 8 if adv_input == "features" else 16
    assert model.adversary.head[0].in_features == expected_in


def test_baseline_has_neither_attention_nor_adversary():
    model = Embedder(model_cfg(attention=False, adversary=False), num_train_classes=5, image_size=32)
    assert model.pool is None and model.adversary is None
    assert model.embed.in_features == 512
    emb, logits = model(torch.randn(4, 3, 32, 32))
    assert logits is None and emb.shape == (4, 16)
    assert set(model.parameter_groups()) == {"backbone", "heads", "adversary"}
    assert model.parameter_groups()["adversary"] == []


def test_zero_lambda_leaves_backbone_gradient_equal_to_baseline():
    torch.manual_seed(0)
    model = Embedder(model_cfg(), num_train_classes=3, image_size=32)
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 0, 1, 1, 2, 2])
    model.eval()  # fixed BatchNorm statistics: identical forward passes

    def backbone_grad(with_adversary):
        model.zero_grad()
        last, desc = model.forward_features(x)
        fused = torch.cat([last, desc.flatten(1)], dim=1)
        loss = torch.nn.functional.normalize(model._embed(fused), dim=1)[:, 0].sum()
        if with_adversary:
            logits, _ = model.adversary(fused, 0.0)
            loss = loss + torch.nn.functional.cross_entropy(logits, y)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.backbone.parameters()])

    base, adv = backbone_grad(False), backbone_grad(True)
    assert base.abs().sum() > 0
    assert torch.equal(base, adv)


def test_confusion_sends_the_features_the_gradient_of_the_cross_entropy_to_uniform():
    from pipeline.model.adversary import ClassAdversary, confusion_loss

    torch.manual_seed(0)
    head = ClassAdversary(6, 4, hidden=8, dropout=0.0, mode="confusion")
    x = torch.randn(5, 6, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 0])
    logits, feature_loss = head(x, 0.7)
    (torch.nn.functional.cross_entropy(logits, y) + feature_loss).backward()
    got_x, got_head = x.grad.clone(), [p.grad.clone() for p in head.parameters()]

    x2 = x.detach().clone().requires_grad_(True)
    (0.7 * confusion_loss(head.head(x2))).backward()  # the features: lambda x d CE(head(x), uniform) / dx
    assert torch.allclose(got_x, x2.grad, atol=1e-7)
    head.zero_grad()
    torch.nn.functional.cross_entropy(head.head(x.detach()), y).backward()  # the head: plain classification
    assert all(torch.allclose(a, p.grad, atol=1e-7) for a, p in zip(got_head, head.parameters()))


@pytest.mark.parametrize("kind", ["additive", "cbam"])
def test_the_taps_placement_sends_the_last_layer_nothing(kind):
    model = Embedder(model_cfg(adv_input="taps", kind=kind, taps=["layer2", "layer3"]), 5, image_size=32)
    model.train()
    _, adversarial = model(torch.randn(4, 3, 32, 32), 1.0)
    torch.nn.functional.cross_entropy(adversarial.logits, torch.tensor([0, 1, 2, 3])).backward()
    net = model.backbone.net
    last_layer = [p.grad for p in net.layer4.parameters()]
    assert all(g is None or not g.any() for g in last_layer)  # layer4 only makes the last feature
    if kind == "additive":
        assert all(p.grad is None or not p.grad.any() for p in model.pool.query.parameters())
    assert any(p.grad is not None and p.grad.any() for p in net.layer3.parameters())  # the taps do get it
    assert model.adversary.head[0].in_features == 2 * 8


def test_gradient_norms_at_the_adversary_input_are_recorded_per_path():
    model = Embedder(model_cfg(), 3, image_size=32)
    model.train()
    model.measure_gradients = True
    emb, adversarial = model(torch.randn(6, 3, 32, 32), 0.0)  # lambda 0: reversal sends back nothing
    (emb.sum() + torch.nn.functional.cross_entropy(adversarial.logits, torch.tensor([0, 1, 2] * 2))).backward()
    assert model.grad_norms["dml"] > 0 and model.grad_norms["adv"] == 0
    _, adversarial = model(torch.randn(6, 3, 32, 32), 0.5)
    torch.nn.functional.cross_entropy(adversarial.logits, torch.tensor([0, 1, 2] * 2)).backward()
    assert model.grad_norms["adv"] > 0 and "dml" not in model.grad_norms
