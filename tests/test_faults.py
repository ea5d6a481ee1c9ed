"""Resuming, a lost worker, NaN losses, an unreachable tracking server, and the GPU runtime choice."""

import math
import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.checkpoint import NonFiniteLoss, latest_checkpoint, load_checkpoint, load_latest
from pipeline.launch import train_and_evaluate
from pipeline.runtime import Capabilities, choose, decide_device
from tests.conftest import TINY


def _with(cfg, **sections):
    return cfg.model_copy(update={k: getattr(cfg, k).model_copy(update=v) for k, v in sections.items()})


def _history(result, key="loss"):
    return [m.step for m in MlflowClient(result.tracking_uri).get_metric_history(result.run_id, key)]


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


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_lost_workers_restart_then_give_up_in_one_line_and_the_rerun_resumes_exactly(tiny_cfg, tmp_path, monkeypatch):
    import os
    import signal
    import threading
    import time

    import ray

    from pipeline import launch
    from pipeline.errors import TrainingFailed

    trace = tmp_path / "trace"
    trace.mkdir()
    real_fit = launch.fit
    monkeypatch.setattr(launch, "fit", lambda cfg, tracker, name, local, progress=True: real_fit(
        cfg, tracker, name, local, progress, extra={"trace_dir": str(trace)} if name == "faulty" else None))
    steps = 24 // (2 * 4)  # per epoch with 2 ranks and P=4
    base = _with(tiny_cfg, train={"epochs": 5, "workers": 2, "max_failures": 1})  # the DANN ramp, by default
    assert base.model.adversary.schedule == "dann"
    marker = tmp_path / "ray" / "faulty" / ".fault-injected"

    def kill_a_worker_later() -> None:
        """After the injected crash and Ray Train's restart, once epoch 3 is checkpointed: SIGKILL rank 0."""
        while True:
            latest = load_latest(str(tmp_path / "ray"), "faulty")
            pid_file = trace / "rank0.pid"
            if (marker.exists() and latest and latest[1]["epoch"] >= 3
                    and pid_file.stat().st_mtime > marker.stat().st_mtime):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
                return
            time.sleep(0.1)

    try:
        straight = train_and_evaluate(_with(base, train={"name": "straight"}), local=False, progress=False,
                                      plots=False)
        killer = threading.Thread(target=kill_a_worker_later, daemon=True)
        killer.start()
        faulty = _with(base, train={"name": "faulty"}, fault={"crash_rank": 1, "crash_step": steps + 2})
        with pytest.raises(TrainingFailed) as failed:
            train_and_evaluate(faulty, local=False, progress=False, plots=False)
        message = str(failed.value)
        assert "\n" not in message and "train.max_failures" in message and "rank 0: its process died" in message
        assert "(epoch 3); run again with --set train.name=faulty to resume from it" in message
        assert marker.read_text().startswith("rank 1 crashed at step")  # the first loss: restarted by Ray Train
        client = MlflowClient(tiny_cfg.tracking.uri)
        run = client.search_runs([client.get_experiment_by_name("tests").experiment_id],
                                 "tags.`gdml.run_name` = 'faulty'")[0]
        assert run.info.status == "FAILED"

        resumed = train_and_evaluate(_with(faulty, fault={"crash_rank": None, "crash_step": None}), local=False,
                                     progress=False, plots=False)
    finally:
        ray.shutdown()
    assert resumed.run_id == run.info.run_id and _history(resumed) == [1, 2, 3, 4, 5]  # each epoch logged once
    assert client.get_run(resumed.run_id).info.status == "FINISHED"
    assert_same_state(load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint))
    for rank in (0, 1):  # no checkpointed epoch was trained again, through two losses and a rerun
        trained = [int(e) for e in (trace / f"rank{rank}-epochs.log").read_text().split()]
        assert trained[:3] == [1, 2, 3] and sorted(set(trained)) == [1, 2, 3, 4, 5]
        # a rank writes an epoch down when its training ends, before the checkpoint: only epoch 4, trained
        # but not yet checkpointed when rank 0 was killed, may have been trained twice
        assert [e for e in set(trained) if trained.count(e) > 1] in ([], [4])


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(400)
def test_an_interrupted_driver_marks_the_run_killed_stops_ray_and_the_rerun_resumes(tmp_path, tiny_shards, request):
    import os
    import shutil
    import signal
    import tempfile
    import time

    import psutil

    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit in 107 characters
    request.addfinalizer(lambda: shutil.rmtree(ray_tmp, ignore_errors=True))
    overrides = {**TINY, "data.root": str(tiny_shards), "train.storage_path": str(tmp_path / "ray"),
                 "train.epochs": 8, "train.workers": 1, "train.name": "stopped",
                 "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment": "stop"}
    args = [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "train", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "RAY_TMPDIR": ray_tmp})
    deadline = time.monotonic() + 240
    while not latest_checkpoint(str(tmp_path / "ray"), "stopped") and time.monotonic() < deadline:
        time.sleep(0.2)
    driver.send_signal(signal.SIGTERM)
    _, err = driver.communicate(timeout=120)
    assert driver.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("gdml: interrupted; the MLflow run is marked KILLED")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("stop").experiment_id])
    assert run.info.status == "KILLED"
    time.sleep(3)
    left = [p for p in psutil.process_iter(["cmdline"]) if ray_tmp in " ".join(p.info["cmdline"] or [])]
    assert not left, [p.info["cmdline"][:3] for p in left]  # Ray went down with the driver

    epoch = load_latest(str(tmp_path / "ray"), "stopped")[1]["epoch"]
    assert 1 <= epoch < 8
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", "--local", *args], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, 9))


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_nan_on_one_rank_stops_every_rank_in_one_line_or_is_skipped_on_every_rank(tiny_cfg):
    import ray

    from pipeline.errors import TrainingFailed

    cfg = _with(tiny_cfg, train={"workers": 2, "max_failures": 0, "name": "nan-ddp"},
                fault={"nan_step": 2, "nan_rank": 1})
    try:
        with pytest.raises(TrainingFailed) as failed:
            train_and_evaluate(cfg, local=False, progress=False, plots=False)
        skipped = train_and_evaluate(_with(cfg, train={"nonfinite": "skip", "name": "nan-ddp-skip"}), local=False,
                                     progress=False, plots=False)
    finally:
        ray.shutdown()
    # skip: both ranks drop the same step (rank 1's NaN reaches rank 0 through the all-reduce), the run finishes
    state = load_checkpoint(skipped.checkpoint)
    assert state["metrics"]["skipped_steps"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert MlflowClient(skipped.tracking_uri).get_run(skipped.run_id).data.metrics["skipped_steps"] == 1
    message = str(failed.value)
    assert "\n" not in message
    assert "rank 1: non-finite loss and gradient norm at epoch 1, step 2 (global step 2)" in message
    # rank 1's NaN reaches rank 0 through DDP's all-reduce of the gradients: both stop at the same step
    assert "rank 0: non-finite gradient norm at epoch 1, step 2 (global step 2)" in message
    assert "no checkpoint was written" in message and latest_checkpoint(cfg.train.storage_path, "nan-ddp") is None


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


@pytest.mark.slow
def test_the_same_seed_gives_bit_identical_weights_in_local_mode(tiny_cfg):
    """Two runs in one process (the per-epoch evaluation once raised torch's OpenMP threads between them).
    With 2 Ray workers the same holds: see the exact-resume test, where a straight run and an interrupted one
    end bit for bit alike."""
    cfg = _with(tiny_cfg, train={"epochs": 2})
    a = train_and_evaluate(_with(cfg, train={"name": "same-a"}), local=True, progress=False, plots=False)
    b = train_and_evaluate(_with(cfg, train={"name": "same-b"}), local=True, progress=False, plots=False)
    assert_same_state(load_checkpoint(a.checkpoint), load_checkpoint(b.checkpoint))
    assert a.metrics == b.metrics
