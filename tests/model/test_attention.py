import pytest
import torch

from pipeline.model.attention import TapPooling


@pytest.mark.parametrize("shared", [True, False])
def test_additive_attention_weights_are_a_distribution_over_positions(shared):
    pool = TapPooling({"a": 4, "b": 6}, last_channels=10, width=8, kind="additive", shared=shared)
    assert len(pool.attend) == (1 if shared else 2)
    out = pool({"a": torch.randn(3, 4, 8, 8), "b": torch.randn(3, 6, 4, 4)}, torch.randn(3, 10))
    assert out.shape == (3, 2, 8)
    for tap, side in (("a", 8), ("b", 4)):
        w = pool.last_weights[tap]
        assert w.shape == (3, side, side)  # over the tap's positions, shaped like its map
        assert torch.allclose(w.sum(dim=(1, 2)), torch.ones(3))


def test_the_query_changes_the_weights():
    torch.manual_seed(0)
    pool = TapPooling({"a": 4}, last_channels=6, width=8, kind="additive")
    local = {"a": torch.randn(1, 4, 5, 5)}
    pool(local, torch.randn(1, 6))
    first = pool.last_weights["a"]
    pool(local, torch.randn(1, 6) * 5)
    assert not torch.allclose(first, pool.last_weights["a"])


def test_attention_picks_the_salient_position():
    pool = TapPooling({"a": 2}, last_channels=2, width=2, kind="additive")
    with torch.no_grad():
        pool.project[0].weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        pool.query.weight.zero_()
        pool.query.bias.zero_()
        pool.attend[0].score.weight.copy_(torch.tensor([1.0, 0.0]).view(1, 2, 1, 1) * 10)
    local = torch.zeros(1, 2, 2, 2)
    local[0, 0, 1, 1] = 1.0  # one position lights up channel 0
    pool({"a": local}, torch.zeros(1, 2))
    assert pool.last_weights["a"].argmax().item() == 3


def test_cbam_and_avg_give_one_descriptor_per_tap():
    maps = {"a": torch.randn(2, 4, 8, 8), "b": torch.randn(2, 6, 4, 4)}
    for kind in ("cbam", "avg"):
        pool = TapPooling({"a": 4, "b": 6}, last_channels=10, width=8, kind=kind)
        assert pool(maps, torch.randn(2, 10)).shape == (2, 2, 8)
    cbam = TapPooling({"a": 4}, 10, 8, "cbam")
    cbam(maps, torch.randn(2, 10))
    assert ((cbam.last_weights["a"] > 0) & (cbam.last_weights["a"] < 1)).all()
