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


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("kind", ["additive", "cbam", "avg"])
def test_every_backbone_and_attention_kind_gives_unit_embeddings(backbone, kind):
    model = Embedder(model_cfg(backbone, kind=kind), num_train_classes=5, image_size=64)
    emb, logits = model(torch.randn(2, 3, 64, 64), lam=0.5)
    assert emb.shape == (2, 16)
    assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
    assert logits.shape == (2, 5)
    model.eval()
    assert model(torch.randn(2, 3, 64, 64))[1] is None  # no adversary at inference


@pytest.mark.parametrize("fusion", ["concat", "sum"])
@pytest.mark.parametrize("adv_input", ["features", "embedding"])
def test_fusion_and_adversary_input(fusion, adv_input):
    model = Embedder(model_cfg(fusion=fusion, adv_input=adv_input, taps=["layer1", "layer3"]), 7, image_size=32)
    emb, logits = model(torch.randn(3, 3, 32, 32), 0.1)
    assert emb.shape == (3, 16) and logits.shape == (3, 7)
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
        emb, _ = model(x)
        loss = emb[:, 0].sum()
        if with_adversary:
            logits = model.adversary(model.features(x), 0.0)
            loss = loss + torch.nn.functional.cross_entropy(logits, y)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.backbone.parameters()])

    base, adv = backbone_grad(False), backbone_grad(True)
    assert base.abs().sum() > 0
    assert torch.equal(base, adv)
