"""One DDP step on two half-batches (2 gloo processes) equals one step of one process on the whole batch."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from pipeline.config import Config, LossConfig
from pipeline.model.embedder import Embedder
from pipeline.objectives import MetricLoss, TrainModule

LABELS = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3] * 2)  # each half holds two images of every class
LR = 0.5
# Relative error of each tensor's update: float32 sums taken in another order differ around 1e-6..1e-4.
TOLERANCE = 1e-3


def _module(loss_name: str, world: int, backbone: str = "resnet18") -> TrainModule:
    torch.manual_seed(0)
    base = Config().model
    cfg = base.model_copy(update={
        "backbone": backbone,
        "embedding_size": 8,
        "freeze_bn": True,  # batch statistics would differ between a half and the whole batch
        "attention": base.attention.model_copy(update={"width": 8}),
        "adversary": base.adversary.model_copy(update={"hidden": 16, "dropout": 0.0}),
    })
    return TrainModule(Embedder(cfg, 4, image_size=32), MetricLoss(LossConfig(name=loss_name), 4, 8, world))


def _images() -> torch.Tensor:
    return torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _step(module: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
    module.train()
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=LR)
    loss_dml, loss_adv, _ = module(images, labels, 0.5)
    (loss_dml + loss_adv).backward()
    opt.step()


def _rank(rank: int, world: int, init_file: str, loss_name: str, out: str, backbone: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        module = _module(loss_name, world, backbone)
        half = len(LABELS) // world
        part = slice(rank * half, (rank + 1) * half)
        _step(DistributedDataParallel(module), _images()[part], LABELS[part])
        torch.save(module.state_dict(), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize(("loss_name", "backbone"), [
    ("proxy_anchor", "resnet18"),  # proxies, the attention query, the adversary: what make test checks
    pytest.param("multi_similarity", "resnet18", marks=pytest.mark.full),
    pytest.param("multi_similarity", "timm/test_resnet", marks=pytest.mark.full),
    pytest.param("multi_similarity", "timm/test_vit", marks=pytest.mark.full)])
def test_ddp_step_equals_whole_batch_step(tmp_path, loss_name, backbone):
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), loss_name, str(tmp_path), backbone), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]

    single = _module(loss_name, 1, backbone)
    before = {k: v.clone() for k, v in single.state_dict().items()}
    _step(single, _images(), LABELS)
    expected = single.state_dict()

    moved = [k for k in expected if expected[k].is_floating_point()
             and (expected[k] - before[k]).norm() > 1e-6 * (1 + before[k].norm())]
    if backbone == "resnet18":
        assert "embedder.pool.query.weight" in moved  # the attention query is trained, not cancelled out
    assert any(k.startswith("embedder.pool.project.") for k in moved)  # the taps' projections too
    assert any(k.startswith("embedder.adversary.") for k in moved)  # the adversary's head trained
    assert any(k.startswith("embedder.backbone.") for k in moved)
    if loss_name == "proxy_anchor":
        assert "metric_loss.inner.proxies" in moved  # the proxies trained
    for key in moved:
        assert torch.equal(ranks[0][key], ranks[1][key]), f"{key} differs between ranks"
        want, got = expected[key] - before[key], ranks[0][key] - before[key]
        error = ((got - want).norm() / want.norm()).item()
        assert error < TOLERANCE, f"{key}: DDP update differs from the whole-batch update by {error:.2e}"
    for key in set(expected) - set(moved):
        assert torch.allclose(ranks[0][key].double(), expected[key].double(), atol=1e-6), key


def _ray_step(config: dict) -> None:
    """On each of 2 Ray Train workers: gdml's module, AdamW groups and prepare_model, one step on half the batch."""
    import ray.train
    import ray.train.torch

    from pipeline.train import build_optimizer

    torch.set_num_threads(1)
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    for loss_name in config["losses"]:
        module = _module(loss_name, world)
        optimizer = build_optimizer(module, Config.model_validate({"train": {"lr": LR_ADAM, "lr_heads": LR_ADAM}}))
        ddp = ray.train.torch.prepare_model(module, move_to_device=False)
        half = len(LABELS) // world
        part = slice(rank * half, (rank + 1) * half)
        ddp.train()
        loss_dml, loss_adv, _ = ddp(_images()[part], LABELS[part], 0.5)
        optimizer.zero_grad()
        (loss_dml + loss_adv).backward()
        optimizer.step()
        torch.save(module.state_dict(), Path(config["out"]) / f"{loss_name}-rank{rank}.pt")


LR_ADAM = 1e-3


@pytest.mark.full
@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_ray_train_step_with_adamw_equals_the_whole_batch_step(tmp_path, shared_ray):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.train import build_optimizer

    losses = ["multi_similarity", "triplet", "proxy_anchor"]  # triplet: semi-hard mining across ranks
    TorchTrainer(_ray_step, train_loop_config={"losses": losses, "out": str(tmp_path)},
                 scaling_config=ScalingConfig(num_workers=2),
                 run_config=RunConfig(storage_path=str(tmp_path / "ray"))).fit()
    for loss_name in losses:
        ranks = [torch.load(tmp_path / f"{loss_name}-rank{r}.pt", weights_only=True) for r in (0, 1)]
        single = _module(loss_name, 1)
        before = {k: v.clone() for k, v in single.state_dict().items()}
        optimizer = build_optimizer(single, Config.model_validate({"train": {"lr": LR_ADAM, "lr_heads": LR_ADAM}}))
        single.train()
        loss_dml, loss_adv, _ = single(_images(), LABELS, 0.5)
        (loss_dml + loss_adv).backward()
        grads = {name: p.grad.clone() for name, p in single.named_parameters() if p.grad is not None}
        optimizer.step()
        expected = single.state_dict()
        trained = [k for k in grads if grads[k].abs().max() > 0]
        assert any(k.startswith("embedder.adversary.") for k in trained) and len(trained) > 20, loss_name
        if loss_name == "proxy_anchor":
            assert "metric_loss.inner.proxies" in trained
        for key in trained:
            assert torch.equal(ranks[0][key], ranks[1][key]), f"{loss_name}: {key} differs between ranks"
            # AdamW's first step moves a weight by lr x g / (|g| + eps) (plus decay): where |g| is near eps = 1e-8 the
            # step amplifies float32 summation-order noise in g; from 1000 x eps on it is lr x sign(g) to 1e-3
            clear = grads[key].abs() > 1e-5
            got, want = ranks[0][key] - before[key], expected[key] - before[key]
            bad = ~torch.isclose(got, want, rtol=1e-3, atol=1e-7) & clear
            assert not bad.any(), (f"{loss_name}: {key}: {int(bad.sum())} of {int(clear.sum())}; grads there "
                                   f"{grads[key][bad][:5].tolist()} max {grads[key].abs().max():.3g}; got "
                                   f"{got[bad][:5].tolist()} want {want[bad][:5].tolist()}")
