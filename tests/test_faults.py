"""Resuming, a lost worker, NaN losses, an unreachable tracking server, and the GPU runtime choice."""

import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.checkpoint import NonFiniteLoss, latest_checkpoint, load_checkpoint
from pipeline.launch import train_and_evaluate
from pipeline.runtime import Capabilities, choose, decide_device
from tests.conftest import TINY


def _with(cfg, **sections):
    return cfg.model_copy(update={k: getattr(cfg, k).model_copy(update=v) for k, v in sections.items()})


def _history(result, key="loss"):
    return [m.step for m in MlflowClient(result.tracking_uri).get_metric_history(result.run_id, key)]


@pytest.mark.slow
def test_rerun_with_the_same_name_resumes_exactly_and_continues_the_mlflow_run(tiny_cfg):
    # A constant lambda: the DANN ramp depends on the planned number of epochs, which this test changes.
    adversary = tiny_cfg.model.adversary.model_copy(update={"schedule": "constant"})
    tiny_cfg = _with(tiny_cfg, model={"adversary": adversary})
    straight = train_and_evaluate(_with(tiny_cfg, train={"epochs": 3, "name": "straight"}), local=True,
                                  progress=False, plots=False)
    first = train_and_evaluate(_with(tiny_cfg, train={"epochs": 2, "name": "resumed"}), local=True,
                               progress=False, plots=False)
    second = train_and_evaluate(_with(tiny_cfg, train={"epochs": 3, "name": "resumed"}), local=True,
                                progress=False, plots=False)
    assert second.run_id == first.run_id  # the same MLflow run continues
    assert _history(second) == [1, 2, 3]  # every epoch logged exactly once
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(second.checkpoint)
    assert b["epoch"] == 3 and b["step"] == a["step"]
    for key, value in a["model"].items():  # weights, optimiser, RNG and stream position all restored
        assert torch.equal(value, b["model"][key]), key
    assert second.metrics == pytest.approx(straight.metrics)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(400)
def test_a_lost_worker_costs_a_restart_not_the_run(tiny_cfg, tmp_path):
    import ray

    steps = 24 // (2 * 4)  # per epoch with 2 ranks and P=4
    cfg = _with(tiny_cfg, train={"epochs": 3, "workers": 2, "max_failures": 1, "name": "crashy"},
                fault={"crash_rank": 1, "crash_step": steps + 2})  # in the middle of epoch 2
    try:
        result = train_and_evaluate(cfg, local=False, progress=False, plots=False)
    finally:
        ray.shutdown()
    assert (tmp_path / "ray" / "crashy" / ".fault-injected").read_text().startswith("rank 1 crashed at step")
    assert load_checkpoint(result.checkpoint)["epoch"] == 3
    assert _history(result) == [1, 2, 3]
    assert _history(result, "loss_dml") == [1, 2, 3]
    client = MlflowClient(result.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert [r.info.run_id for r in runs] == [result.run_id]  # one MLflow run, not two
    assert runs[0].info.status == "FINISHED"


@pytest.mark.slow
def test_nan_loss_stops_naming_epoch_step_and_term_before_any_checkpoint(tiny_cfg):
    cfg = _with(tiny_cfg, train={"name": "nan-stop"}, fault={"nan_step": 2})
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss and gradient norm at epoch 1, step 2 \(global step 2\)"):
        train_and_evaluate(cfg, local=True, progress=False, plots=False)
    assert latest_checkpoint(cfg.train.storage_path, "nan-stop") is None
    client = MlflowClient(cfg.tracking.uri)
    run = client.search_runs([client.get_experiment_by_name("tests").experiment_id])[0]
    assert run.info.status == "FAILED"


@pytest.mark.slow
def test_nan_loss_can_be_skipped_and_counted(tiny_cfg):
    cfg = _with(tiny_cfg, train={"name": "nan-skip", "nonfinite": "skip"}, fault={"nan_step": 2})
    result = train_and_evaluate(cfg, local=True, progress=False, plots=False)
    state = load_checkpoint(result.checkpoint)
    assert state["metrics"]["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert MlflowClient(result.tracking_uri).get_run(result.run_id).data.metrics["skipped_steps"] == 1


@pytest.mark.slow
def test_unreachable_tracking_server_stops_before_training(tmp_path, tiny_shards):
    base = [sys.executable, "-m", "pipeline.cli", "train", "--local", "--set", f"data.root={tiny_shards}",
            "--set", f"train.storage_path={tmp_path / 'ray'}", "--set", "tracking.uri=http://127.0.0.1:9",
            "--set", "train.max_steps_per_epoch=1"]
    base += [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
    proc = subprocess.run(base, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "gdml: MLflow tracking server http://127.0.0.1:9 is unreachable (ConnectionError); nothing was trained. "
        "Start it, point MLFLOW_TRACKING_URI elsewhere, or set tracking.required=false to train untracked"]
    assert not (tmp_path / "ray").exists()

    proc = subprocess.run(base + ["--set", "tracking.required=false"], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "training WITHOUT tracking" in proc.stderr
    assert "recall_at_1" in proc.stdout


@pytest.mark.parametrize(
    ("caps", "amp", "expected_dtype", "scaler", "channels_last"),
    [
        (Capabilities(cuda=False), "auto", None, False, False),
        (Capabilities(cuda=True, bf16=True), "auto", torch.bfloat16, False, True),
        (Capabilities(cuda=True, bf16=False), "auto", torch.float16, True, True),
        (Capabilities(cuda=True, bf16=True), "off", None, False, True),
        (Capabilities(cuda=True, bf16=True), "fp16", torch.float16, True, True),
    ],
)
def test_runtime_choice_follows_the_hardware(caps, amp, expected_dtype, scaler, channels_last):
    device = decide_device("auto", caps)
    assert device.type == ("cuda" if caps.cuda else "cpu")
    choice = choose(device, caps, amp)
    assert choice.amp_dtype == expected_dtype
    assert choice.grad_scaler is scaler
    assert choice.channels_last is channels_last and choice.pin_memory is caps.cuda
    assert choose(device, caps, amp, channels_last="off").channels_last is False
    cpu = choose(decide_device("cpu", caps), caps, amp)  # train.device=cpu on a GPU machine: float32, no pinning
    assert cpu.device.type == "cpu" and cpu.pin_memory is False and cpu.amp_dtype == (
        None if amp in ("auto", "off") else expected_dtype)


@pytest.mark.parametrize(
    ("requested", "caps", "assigned", "expected"),
    [
        ("auto", Capabilities(cuda=False), None, "cpu"),
        ("auto", Capabilities(cuda=True), None, "cuda:0"),  # local mode on a GPU machine
        ("auto", Capabilities(cuda=True), torch.device("cuda", 1), "cuda:1"),  # Ray Train gave this worker GPU 1
        ("cpu", Capabilities(cuda=True), torch.device("cuda", 1), "cpu"),  # forced
        ("cuda", Capabilities(cuda=True), None, "cuda:0"),
    ],
)
def test_one_device_decision(requested, caps, assigned, expected):
    assert str(decide_device(requested, caps, assigned)) == expected


def test_cuda_without_a_gpu_is_a_config_error():
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="train.device: cuda was asked for, but no CUDA device is visible"):
        decide_device("cuda", Capabilities(cuda=False))


def test_cpu_bf16_autocast_runs_a_training_step_when_forced():
    from pipeline.model.embedder import Embedder
    from tests.model.test_embedder import model_cfg

    choice = choose(torch.device("cpu"), Capabilities(cuda=False), "bf16")
    model = Embedder(model_cfg(), 3, image_size=32)
    with choice.autocast():
        emb, adversarial = model(torch.randn(4, 3, 32, 32), 0.1)
    assert emb.dtype == torch.bfloat16
    (emb.float().sum() + adversarial.logits.float().sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
