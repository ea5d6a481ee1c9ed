"""Resuming, a lost worker, NaN losses, an unreachable tracking server, and the GPU runtime choice."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline import config as config_mod
from pipeline.checkpoint import NonFiniteLoss, latest_checkpoint, load_checkpoint, load_latest
from pipeline.launch import train_and_evaluate
from pipeline.runtime import Capabilities, choose, decide_device
from tests.conftest import TINY, cli_args, wait_for


def _with(cfg, **sections):
    return cfg.model_copy(update={k: getattr(cfg, k).model_copy(update=v) for k, v in sections.items()})


def _history(result, key="loss"):
    return [m.step for m in MlflowClient(result.tracking_uri).get_metric_history(result.run_id, key)]


@pytest.mark.full
@pytest.mark.slow
def test_more_epochs_on_resume_keep_the_ramp_horizon_and_are_recorded(tiny_cfg):
    """Resuming with more epochs than planned: the DANN ramp keeps the horizon it started with (lambda stays at its
    final value after it), so the epochs already run are not changed after the fact; the change is tagged."""
    first = train_and_evaluate(_with(tiny_cfg, train={"epochs": 2, "name": "resumed"}), local=True,
                               progress=False, plots=False)
    second = train_and_evaluate(_with(tiny_cfg, train={"epochs": 3, "name": "resumed"}), local=True,
                                progress=False, plots=False)
    assert second.run_id == first.run_id  # the same MLflow run continues
    assert _history(second) == [1, 2, 3]  # every epoch logged exactly once
    state = load_checkpoint(second.checkpoint)
    steps = 24 // 4
    assert state["loop"]["ramp_steps"] == 2 * steps  # the horizon of the first start
    client = MlflowClient(second.tracking_uri)
    lam = {m.step: m.value for m in client.get_metric_history(second.run_id, "adv_lambda")}
    assert lam[3] == pytest.approx(0.1 * (2 / (1 + math.exp(-10)) - 1))  # the ramp's end, held
    assert client.get_run(second.run_id).data.tags["resumed_with.train.epochs"] == "2 -> 3"


def assert_same_state(a: dict, b: dict) -> None:
    """Two checkpoints hold the same training state: weights, loss parameters, optimiser, RNG, loop, position."""
    for part in ("model", "loss"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for index, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][key]), f"optimizer {index}.{key}"
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"]) and a["rng"]["python"] == b["rng"]["python"]
    assert torch.equal(a["rng"]["numpy"][0], b["rng"]["numpy"][0]) and a["rng"]["numpy"][1] == b["rng"]["numpy"][1]
    assert (a["epoch"], a["step"], a["loop"]) == (b["epoch"], b["step"], b["loop"])



@pytest.mark.full
@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(480)
def test_lost_workers_restart_then_give_up_in_one_line_and_the_rerun_resumes_exactly(tiny_cfg, tmp_path, monkeypatch,
                                                                                      shared_ray, capfd):
    """A straight 2-worker run (2 loader workers each: what every rank trained on is traced), and the same run with
    two losses: rank 1 dies in epoch 2 (Ray Train restarts the group from epoch 1's checkpoint), then rank 0 is
    killed while both ranks are held before epoch 4 (one restart allowed: the run fails, in one line). The rerun
    resumes from epoch 3 and ends bit for bit where the straight run did; no epoch was trained twice."""
    import signal
    from concurrent.futures import ThreadPoolExecutor

    from pipeline import launch
    from pipeline.errors import TrainingFailed
    from pipeline.train import Hooks
    from tests.test_train import check_mlflow, check_two_rank_trace

    real_fit = launch.fit

    def traced_fit(cfg, tracker, name, local, progress=True, hooks=None, epoch_gate=None, callbacks=None):
        trace = tmp_path / f"trace-{name}"
        trace.mkdir(exist_ok=True)
        return real_fit(cfg, tracker, name, local, progress, Hooks(trace_dir=str(trace)), epoch_gate, callbacks)

    monkeypatch.setattr(launch, "fit", traced_fit)
    base = config_mod.with_values(tiny_cfg, {"train.epochs": 4, "train.workers": 2, "train.max_failures": 1,
                                             "sampler.loader_workers": 2, "sampler.remainder": "drop"})
    assert base.model.adversary.schedule == "dann"  # the DANN ramp, by default: resuming must keep its horizon
    steps = 2  # per epoch and rank: 24 classes / (2 ranks x 2 loader workers x P=4), one strict pass
    straight = train_and_evaluate(config_mod.with_values(base, {"train.name": "straight"}), local=False,
                                  progress=False)
    check_mlflow(straight, epochs=4)
    check_two_rank_trace(tmp_path / "trace-straight", epochs=4)
    params = MlflowClient(straight.tracking_uri).get_run(straight.run_id).data.params
    assert params["runtime.loader_workers"] == "2" and params["runtime.world_size"] == "2"

    release = tmp_path / "release"
    faulty = config_mod.with_values(base, {"train.name": "faulty", "fault.crash_rank": 1,
                                           "fault.crash_step": steps + 1, "fault.pause_epoch": 4,
                                           "fault.pause_file": str(release)})
    marker = tmp_path / "ray" / "faulty" / ".fault-injected"

    def kill_rank0_when_held() -> None:
        """Once the restarted ranks are held before epoch 4 (epoch 3 checkpointed): SIGKILL rank 0, then let go."""
        held = Path(f"{release}.rank0")
        wait_for(held.exists, 300, "rank 0 to be held before epoch 4")
        assert marker.read_text().startswith("rank 1 crashed at step 3")  # the first loss came first
        os.kill(int(held.read_text()), signal.SIGKILL)
        release.touch()  # the rerun passes epoch 4's hold

    with ThreadPoolExecutor(1) as pool:
        killer = pool.submit(kill_rank0_when_held)
        with pytest.raises(TrainingFailed) as failed:
            train_and_evaluate(faulty, local=False, progress=False, plots=False)
        killer.result(timeout=60)  # (its own failure, if any, is the test's)
    restarts = [line for line in capfd.readouterr().out.splitlines() if "Ray Train restarts the workers" in line]
    assert len(restarts) == 1, restarts  # the first loss restarts (one console line); the second ends the run
    assert re.search(r"gdml: faulty: lost (rank 0 \(\w+\), )?rank 1 \(\w+\); Ray Train restarts the workers from the "
                     r"checkpoint of epoch 1 \(.*checkpoint_epoch=0001\) \(failure 1 of train.max_failures=1\)$",
                     restarts[0])
    message = str(failed.value)
    assert "\n" not in message and "train.max_failures" in message and "rank 0: its process died" in message
    assert "(epoch 3); run again with --set train.name=faulty to resume from it" in message
    client = MlflowClient(tiny_cfg.tracking.uri)
    [run] = client.search_runs([client.get_experiment_by_name("tests").experiment_id],
                               "tags.`gdml.run_name` = 'faulty'")
    assert run.info.status == "FAILED"

    resumed = train_and_evaluate(config_mod.with_values(faulty, {"fault.crash_rank": None, "fault.crash_step": None}),
                                 local=False, progress=False, plots=False)
    assert resumed.run_id == run.info.run_id and _history(resumed) == [1, 2, 3, 4]  # each epoch logged once
    assert client.get_run(resumed.run_id).info.status == "FINISHED"
    assert_same_state(load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint))
    for rank in (0, 1):  # a rank writes an epoch down when its training ends: each epoch exactly once, in order
        trained = [int(e) for e in (tmp_path / "trace-faulty" / f"rank{rank}-epochs.log").read_text().split()]
        assert trained == [1, 2, 3, 4], (rank, trained)


@pytest.mark.full
@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(300)
def test_an_interrupted_driver_marks_the_run_killed_stops_ray_and_the_rerun_resumes(tmp_path, tiny_shards, request,
                                                                                     no_shared_ray):
    """SIGTERM to ``gdml train`` while its worker is held before epoch 2: exit 130 with one line, the MLflow run
    KILLED, every Ray process the driver started gone; the rerun (local mode) resumes from epoch 1."""
    import shutil
    import signal
    import tempfile

    import psutil

    from pipeline import cli

    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit in 107 characters
    request.addfinalizer(lambda: shutil.rmtree(ray_tmp, ignore_errors=True))
    release = tmp_path / "release"
    overrides = {**TINY, "data.root": str(tiny_shards), "train.storage_path": str(tmp_path / "ray"),
                 "train.epochs": 3, "train.workers": 1, "train.name": "stopped",
                 "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment": "stop",
                 "fault.pause_epoch": 2, "fault.pause_file": str(release)}
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "train", *cli_args(overrides)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "RAY_TMPDIR": ray_tmp})
    try:
        wait_for(Path(f"{release}.rank0").exists, 240, "the worker to be held before epoch 2")
        started = psutil.Process(driver.pid).children(recursive=True)  # the driver's Ray, its worker among them
        driver.send_signal(signal.SIGTERM)
        _, err = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("gdml: interrupted; the MLflow run is marked KILLED")
    _, alive = psutil.wait_procs(started, timeout=60)
    assert not alive, [p.pid for p in alive]  # Ray went down with the driver
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("stop").experiment_id])
    assert run.info.status == "KILLED"
    assert load_latest(str(tmp_path / "ray"), "stopped")[1]["epoch"] == 1  # held before epoch 2

    release.touch()
    assert cli.main(["train", "--local", *cli_args(overrides)]) == 0
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3]


@pytest.mark.full
@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_nan_on_one_rank_stops_every_rank_in_one_line_or_is_skipped_on_every_rank(tiny_cfg, shared_ray):
    from pipeline.errors import TrainingFailed

    cfg = _with(tiny_cfg, train={"workers": 2, "max_failures": 0, "name": "nan-ddp"},
                fault={"nan_step": 2, "nan_rank": 1})
    with pytest.raises(TrainingFailed) as failed:
        train_and_evaluate(cfg, local=False, progress=False, plots=False)
    skipped = train_and_evaluate(_with(cfg, train={"nonfinite": "skip", "name": "nan-ddp-skip"}), local=False,
                                 progress=False, plots=False)
    # skip: both ranks drop the same step (rank 1's NaN reaches rank 0 through the all-reduce), the run finishes
    state = load_checkpoint(skipped.checkpoint)
    assert state["metrics"]["skipped_steps"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert MlflowClient(skipped.tracking_uri).get_run(skipped.run_id).data.metrics["skipped_steps"] == 1
    message = str(failed.value)
    assert "\n" not in message
    assert "rank 1: non-finite loss and gradient norm at epoch 1, step 2 (global step 2)" in message
    # rank 1's NaN reaches rank 0 through DDP's all-reduce of the gradients, so rank 0 stops at the same step; its
    # own error is in the line when it reached Ray Train before the worker group was stopped (a matter of timing)
    assert "rank 0" not in message or "rank 0: non-finite gradient norm at epoch 1, step 2 (global step 2)" in message
    assert "no checkpoint was written" in message and latest_checkpoint(cfg.train.storage_path, "nan-ddp") is None


@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_weights_of_a_straight_one(trained, tmp_path):
    """The session's straight 2-epoch run, and the same config stopped by a NaN at the first step of epoch 2 (one
    line naming epoch, step and term; no checkpoint from it; the run FAILED), then run again: it resumes from epoch
    1 and ends with the straight run's weights, optimiser, RNG and test metrics, bit for bit (same seed, same
    state)."""
    steps = 24 // 4  # per epoch: 24 training classes, P=4
    cfg = config_mod.with_values(trained.cfg, {"train.name": "interrupted", "train.storage_path": str(tmp_path),
                                               "fault.nan_step": steps + 1})
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss and gradient norm at epoch 2, step 1 \(global step 7\)"):
        train_and_evaluate(cfg, local=True, progress=False, plots=False)
    assert load_latest(str(tmp_path), "interrupted")[1]["epoch"] == 1
    client = MlflowClient(cfg.tracking.uri)
    [run] = client.search_runs([client.get_experiment_by_name("tests").experiment_id],
                               "tags.`gdml.run_name` = 'interrupted'")
    assert run.info.status == "FAILED"

    resumed = train_and_evaluate(config_mod.with_values(cfg, {"fault.nan_step": None}), local=True, progress=False,
                                 plots=False)
    assert resumed.run_id == run.info.run_id and _history(resumed) == [1, 2]  # each epoch logged once
    assert_same_state(load_checkpoint(trained.result.checkpoint), load_checkpoint(resumed.checkpoint))
    assert resumed.metrics == trained.result.metrics


@pytest.mark.full
@pytest.mark.slow
def test_nan_loss_can_be_skipped_and_counted(tiny_cfg):
    cfg = _with(tiny_cfg, train={"name": "nan-skip", "nonfinite": "skip"}, fault={"nan_step": 2})
    result = train_and_evaluate(cfg, local=True, progress=False, plots=False)
    state = load_checkpoint(result.checkpoint)
    assert state["metrics"]["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert MlflowClient(result.tracking_uri).get_run(result.run_id).data.metrics["skipped_steps"] == 1


@pytest.mark.slow
def test_an_unreachable_tracking_server_stops_before_training_unless_tracking_is_optional(tmp_path, tiny_cfg,
                                                                                          caplog):
    """Through the real command (its exit code and its one line on stderr), then in this process untracked."""
    overrides = {**TINY, "data.root": tiny_cfg.data.root, "train.storage_path": str(tmp_path / "ray"),
                 "tracking.uri": "http://127.0.0.1:9", "train.max_steps_per_epoch": 1}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", "--local", *cli_args(overrides)],
                          capture_output=True, text=True, timeout=100, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "gdml: MLflow tracking server http://127.0.0.1:9 is unreachable (ConnectionError); nothing was trained. "
        "Start it, point MLFLOW_TRACKING_URI elsewhere, or set tracking.required=false to train untracked"]
    assert not (tmp_path / "ray").exists()

    cfg = config_mod.with_values(tiny_cfg, {"tracking.uri": "http://127.0.0.1:9", "tracking.required": False,
                                            "train.max_steps_per_epoch": 1})
    result = train_and_evaluate(cfg, local=True, progress=False, plots=False)
    assert result.run_id is None and 0 <= result.metrics["recall_at_1"] <= 1
    assert "training WITHOUT tracking" in caplog.text


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


@pytest.mark.parametrize(("requested", "torch_cuda", "given", "devices", "unusable"), [
    ("auto", False, 1, False, "Ray gave this worker 1 GPU(s)"),  # Ray (NVML) sees the GPU, torch does not
    ("auto", False, 0, True, "this machine has NVIDIA GPUs"),  # local mode on such a machine
    ("cuda", False, 2, True, "Ray gave this worker 2 GPU(s)"),
    ("cpu", False, 1, True, None),  # asked for: the CPU of a GPU machine
    ("auto", True, 1, True, None),  # torch can use it
    ("auto", False, 0, False, None),  # a CPU machine
])
def test_a_gpu_torch_cannot_use_is_an_error_not_a_silent_cpu_run(requested, torch_cuda, given, devices, unusable):
    from pipeline.runtime import unusable_gpu

    problem = unusable_gpu(requested, torch_cuda, given, devices)
    if unusable is None:
        assert problem is None
    else:
        assert problem.startswith(f"train.device: {unusable}") and "driver is older than the CUDA" in problem
        assert problem.endswith("or set train.device=cpu to train on the CPU") and "\n" not in problem


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
