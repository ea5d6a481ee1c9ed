"""The training state saves and resumes whole: every field of a ``TrainState`` comes back from its checkpoint."""

import random

import numpy as np
import torch

from pipeline.checkpoint import TrainState, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from pipeline.config import Config, LossConfig
from pipeline.model.adversary import Schedule
from pipeline.model.embedder import Embedder
from pipeline.objectives import MetricLoss, TrainModule
from pipeline.train import build_optimizer
from tests.model.test_embedder import model_cfg


def _state(seed: int, schedule: str = "warmup") -> TrainState:
    torch.manual_seed(seed)
    cfg = Config()
    adversary = cfg.model.adversary.model_copy(update={"schedule": schedule})
    module = TrainModule(Embedder(model_cfg("timm/test_resnet", taps=["layer2", "layer3"]), 4, image_size=32),
                         MetricLoss(LossConfig(name="proxy_anchor"), 4, 16))
    return TrainState(module, build_optimizer(module, cfg), torch.amp.GradScaler("cpu", enabled=False),
                      Schedule(adversary, 4, ramp_steps=40))


def test_a_train_state_saved_and_loaded_into_a_fresh_one_has_every_field_back(tmp_path):
    saved = _state(0)
    loss_dml, loss_adv, _ = saved.module(torch.randn(12, 3, 32, 32), torch.tensor([0, 1, 2, 3] * 3), 0.5)
    (loss_dml + loss_adv).backward()
    saved.optimizer.step()  # the optimiser has moments to save
    saved.epoch, saved.step, saved.skipped_steps = 3, 17, 2
    for step in range(5):
        saved.schedule.observe(0.9, step)  # the warmup schedule has its running mean and its start
    assert saved.schedule.warmup_done_at is not None
    save_checkpoint(tmp_path / "c", saved, Config(), 4, {"loss": 1.0})
    after_save = (torch.rand(3), random.random(), np.random.rand())

    fresh = _state(1)
    random.seed(99)
    fresh.load_state_dict(load_checkpoint(tmp_path / "c"))
    assert (torch.rand(3).tolist(), random.random(), np.random.rand()) == (after_save[0].tolist(), *after_save[1:])
    assert (fresh.epoch, fresh.step, fresh.skipped_steps) == (3, 17, 2)
    assert fresh.schedule.state_dict() == saved.schedule.state_dict()
    assert fresh.schedule.lam(20) == saved.schedule.lam(20) > 0
    for a, b in ((saved.module.state_dict(), fresh.module.state_dict()),):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = saved.optimizer.state_dict(), fresh.optimizer.state_dict()
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
    for index, moments in a["state"].items():
        assert all(torch.equal(value, b["state"][index][key]) for key, value in moments.items())
    assert fresh.scaler.state_dict() == saved.scaler.state_dict()


def test_each_rank_gets_its_own_rng_back_and_a_checkpoint_from_a_bigger_gpu_node_loads(tmp_path):
    """The RNG state of each rank (a rank's dropout masks follow it); a checkpoint written where 8 GPUs were
    visible loads on a machine without CUDA (its GPU state is not needed there)."""
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(rng_state())
    state = _state(0)
    eight_gpus = [torch.zeros(16, dtype=torch.uint8)] * 8
    saved = {**state.state_dict(rng_per_rank=states), "rng": {**states[0], "cuda": eight_gpus}}
    for rank in (0, 1):
        torch.manual_seed(123)
        _state(5).load_state_dict(saved, rank=rank, world=2)
        draw = torch.rand(2)
        set_rng_state(states[rank])
        assert torch.equal(draw, torch.rand(2))
    _state(5).load_state_dict(saved, rank=0, world=3)  # another world size: the saved process's own state
    set_rng_state(saved["rng"])  # 8 CUDA states on a machine without CUDA: nothing to restore, no error


def test_optimizer_state_takes_each_parameters_layout_and_a_scaler_from_another_precision_loads(tmp_path):
    """A checkpoint written in channels_last resumes NCHW with the optimiser's moments laid out like the parameters
    (a fused AdamW on a GPU needs it); fp16 <-> bf16/float32 scaler states load either way (an empty one, from a
    run without loss scaling, leaves an fp16 resume a fresh scale)."""
    saved = _state(0)
    saved.module.to(memory_format=torch.channels_last)
    loss_dml, loss_adv, _ = saved.module(torch.randn(12, 3, 32, 32), torch.tensor([0, 1, 2, 3] * 3), 0.5)
    (loss_dml + loss_adv).backward()
    saved.optimizer.step()
    conv = [p for p in saved.module.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] > 1][0]
    assert not saved.optimizer.state[conv]["exp_avg"].is_contiguous()  # saved in channels_last
    state = saved.state_dict()

    fresh = _state(1)  # NCHW
    fresh.load_state_dict(state)
    for p in fresh.module.parameters():
        for key, value in fresh.optimizer.state.get(p, {}).items():
            if value.shape == p.shape:
                assert value.stride() == p.stride(), key
    fresh.optimizer.step()  # and it trains on

    fp16 = torch.amp.GradScaler("cpu", enabled=True, init_scale=1024.0)
    for scaler_state, scaler, expected in (({}, fp16, 1024.0),  # a bf16 / float32 checkpoint resumed as fp16
                                           ({"scale": 8.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                             "growth_interval": 2000, "_growth_tracker": 0}, fp16, 8.0),
                                           ({"scale": 8.0}, torch.amp.GradScaler("cpu", enabled=False), None)):
        target = _state(1)
        target.scaler = scaler
        target.load_state_dict({**state, "scaler": scaler_state})
        assert (target.scaler.get_scale() if scaler.is_enabled() else None) == expected
