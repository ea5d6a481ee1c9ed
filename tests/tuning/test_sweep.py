"""Sweeps: specs, folds, seeded search, and a 3-trial Optuna sweep on 2 folds submitted through the Ray Jobs API
(Ray Tune -> TorchTrainer per fold -> validation classes -> final retrain and test)."""

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml
from mlflow.tracking import MlflowClient

from pipeline.config import ConfigError
from tests.conftest import TINY, stop_process_group
from tuning import sweep

REPO = Path(__file__).resolve().parents[2]


def _write_sweep(tmp_path, tiny_shards, **search):
    base = {k: yaml.safe_load(v) if isinstance(v, str) else v for k, v in TINY.items()}  # TINY holds CLI text
    spec = {
        "name": "t",
        "base": "base.yaml",
        "set": {**base, "data.root": str(tiny_shards), "train.storage_path": str(tmp_path / "ray"),
                "train.val_fraction": 0.25, "train.epochs": 2, "train.workers": 1,
                "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment": "sweeps"},
        "search": {"algorithm": "grid", "num_samples": 1, "metric": "val/recall_at_1",
                   "space": {"model.adversary.weight": {"type": "grid", "values": [0.05, 0.5]}}, **search},
    }
    (tmp_path / "base.yaml").write_text("train:\n  seed: 0\n")
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_bad_sweeps_fail_with_one_clear_line(tmp_path, tiny_shards, capsys):
    path = _write_sweep(tmp_path, tiny_shards, space={"model.adversry.weight": {"type": "grid", "values": [1]}})
    with pytest.raises(ConfigError, match="'model.adversry.weight' is not a config field"):
        sweep.load_spec(path)
    path = _write_sweep(tmp_path, tiny_shards, space={"model.attention.taps": {"type": "choice", "values": [["x9"]]}})
    with pytest.raises(ConfigError, match="'x9' is not a layer of timm/test_resnet"):
        sweep.load_spec(path)
    path = _write_sweep(tmp_path, tiny_shards)
    with pytest.raises(ConfigError, match="train.val_fraction"):
        sweep.load_spec(path, ["train.val_fraction=0"])
    # gdml tune reads the same spec: a bad override is one line and exit code 2, before Ray starts
    from pipeline import cli

    assert cli.main(["tune", "--config", str(path), "--set", "tune.folds=1", "--set", "train.val_fraction=0"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "train.val_fraction" in err


def test_folds_are_seeded_class_disjoint_and_cover_every_training_class(tiny_shards):
    from pipeline.data.shards import load_manifest
    from pipeline.data.stream import validation_classes

    manifest = load_manifest(tiny_shards)
    train = set(manifest.class_ids("train"))
    folds = [validation_classes(manifest, 0.0, 0, 3, f) for f in range(3)]
    assert set().union(*folds) == train and sum(map(len, folds)) == len(train)  # disjoint, covering
    assert sorted(map(len, folds)) == [len(train) // 3] * 3
    assert folds != [validation_classes(manifest, 0.0, 1, 3, f) for f in range(3)]  # the seed deals them
    with pytest.raises(ValueError, match="tune.folds=20 leaves 1 of 24 training classes in a fold"):
        validation_classes(manifest, 0.0, 0, 20, 19)
    with pytest.raises(ConfigError, match="tune.fold=3 needs to be below tune.folds=3"):
        from pipeline import config as config_mod

        config_mod.load(None, ["tune.folds=3", "tune.fold=3"])


def test_fold_summary_is_the_mean_and_its_standard_error():
    mean, se = sweep.fold_summary([0.1, 0.2, 0.3])
    assert mean == pytest.approx(0.2) and se == pytest.approx(0.1 / 3 ** 0.5)
    assert sweep.fold_summary([0.4]) == (0.4, 0.0)


def test_optuna_search_is_seeded():
    spec = sweep.SweepSpec(base="base.yaml", search=sweep.Search(algorithm="optuna", space={
        "model.adversary.weight": sweep.Param(type="loguniform", low=0.01, high=1.0),
        "model.attention.taps": sweep.Param(type="choice", values=[["layer2"], ["layer3"]])}))

    def proposals(seed):
        alg = sweep.search_algorithm(spec.search, seed)
        alg.set_search_properties("val/recall_at_1", "max", sweep.tune_space(spec))
        return [alg.suggest(f"t{i}") for i in range(3)]

    assert proposals(0) == proposals(0) != proposals(1)


def test_random_search_is_seeded_and_keeps_its_concurrency_limit():
    """The same train.seed proposes the same random trials (another seed others), from Tune's own generator."""
    from ray import tune

    spec = sweep.SweepSpec(base="base.yaml", search=sweep.Search(algorithm="random", num_samples=3, space={
        "model.adversary.weight": sweep.Param(type="loguniform", low=0.01, high=1.0),
        "model.attention.taps": sweep.Param(type="choice", values=[["layer2"], ["layer3"], ["layer2", "layer3"]])}))
    tune.register_trainable("gdml_noop", lambda config: None)

    def proposals(seed):
        alg = sweep.search_algorithm(spec.search, seed)
        alg.add_configurations({"noop": {"run": "gdml_noop", "config": sweep.tune_space(spec), "num_samples": 3}})
        return [alg.next_trial().config for _ in range(3)]

    assert proposals(0) == proposals(0) != proposals(1)
    # Tune ignores max_concurrent_trials beside a generator it is given: the limit is set on the generator
    assert sweep.search_algorithm(spec.search, 0, max_concurrent=2).max_concurrent == 2
    optuna = sweep.SweepSpec(base="base.yaml", search=sweep.Search(algorithm="optuna", space=spec.search.space))
    assert sweep.search_algorithm(optuna.search, 0, max_concurrent=2).max_concurrent == 2


def _runs_by_mode(uri):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("sweeps")
    by_mode = {}
    for r in client.search_runs([exp.experiment_id]):
        by_mode.setdefault(r.data.tags.get("mode"), []).append(r)
    return client, by_mode


def _free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _autoscaling_config(path: Path, gcs: int) -> Path:
    """The shape of ray_cluster.yaml on Ray's fake multi-node provider (worker nodes are local processes): a head
    with no CPU, and worker types started from zero - one of 4 CPUs, one labelled with a GPU - by the real
    autoscaler, on the loopback."""
    nothing: dict = {}
    config = {
        "cluster_name": "gdml-test", "max_workers": 2, "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{gcs}"},
        "auth": nothing, "docker": nothing, "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "max_workers": 0, "node_config": nothing},
            "cpu_worker": {"resources": {"CPU": 4}, "min_workers": 0, "max_workers": 1, "node_config": nothing},
            "gpu_worker": {"resources": {"CPU": 1, "GPU": 1}, "min_workers": 0, "max_workers": 1,
                           "node_config": nothing}},
        "file_mounts": nothing, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }
    path.write_text(yaml.safe_dump(config))
    return path


@contextlib.contextmanager
def _autoscaling_cluster(tmp_dir: str, config_dir: Path):
    """A local autoscaling Ray cluster (head with no CPU, workers from zero; 127.0.0.1, its own temp dir and free
    ports, so that another Ray session on the machine does not hold them) for as long as the block runs:
    ``ray start --block`` stops every process it started when it is terminated, and leaves other Ray sessions
    alone. Yields (the Jobs API address, the GCS address, the autoscaling config file)."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    port, gcs, agent, agent_grpc, runtime_env, metrics = _free_ports(6)
    config = _autoscaling_config(config_dir / "cluster.yaml", gcs)
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=0",
                             f"--autoscaling-config={config}", f"--temp-dir={tmp_dir}", "--include-dashboard=true",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={port}", f"--port={gcs}",
                             f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                             f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
                             "--disable-usage-stats"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                                 "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
    # (the head's environment is the jobs' one: `python` is this environment's, as on a cluster set up for gdml)
    try:
        deadline = time.monotonic() + 120
        while True:  # the Jobs API answers once the dashboard is up
            try:
                if requests.get(f"http://127.0.0.1:{port}/api/version", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            assert head.poll() is None and time.monotonic() < deadline, "the Ray head did not start"
            time.sleep(1)
        yield f"http://127.0.0.1:{port}", f"127.0.0.1:{gcs}", config
    finally:
        stop_process_group(head, timeout=60)  # `ray start --block` stops what it started; the group, whatever is left


def _submit(address: str, gcs: str, *command: str, upload: bool = False) -> subprocess.CompletedProcess:
    """``ray job submit`` of a command to the cluster, as ``ray submit`` does (gdml installed on every node, as
    ray_cluster.yaml's set-up installs it), or with ``upload`` this checkout as the job's ``--working-dir``. (Only a
    job that starts no worker node uploads: the fake nodes share one session directory on this machine, so a node
    unpacking the package again pulls the driver's working directory from under it, which real nodes never do.)"""
    # RAY_ADDRESS for the job's processes: Ray Train's placement-group cleaner otherwise looks for "the"
    # cluster on this machine, and finds none it can choose where another Ray session runs beside it
    env_vars = json.dumps({"env_vars": {"RAY_ADDRESS": gcs}})
    where = ["--working-dir", str(REPO)] if upload else []
    for _ in range(15):  # the head's job agent comes up a little after its dashboard
        proc = subprocess.run([str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", address,
                               *where, "--runtime-env-json", env_vars, "--", *command],
                              capture_output=True, text=True, timeout=840)
        if "No available agent to submit job" not in proc.stderr:
            return proc
        time.sleep(2)
    return proc


@pytest.mark.full
@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_a_sweep_submitted_to_an_autoscaling_cluster_scales_it_up_from_zero_and_finishes(tmp_path, tiny_shards,
                                                                                      no_shared_ray):
    """What ``ray submit`` / ``ray job submit --working-dir`` does on a cluster shaped like ray_cluster.yaml (a head
    with no CPU, workers from zero), on Ray's real autoscaler: a seeded Optuna sweep whose trials are scored by the
    mean over 2 class-disjoint folds asks for its nodes, waits for them, and finishes with the final retrain and
    test. On the same cluster: a run on a GPU node type asks a GPU per worker and, where torch cannot use the GPU
    Ray assigned (the GPU is a label here), stops in one line; a run no node type can hold fails before any work.
    (Two trials: the fewest that still make a best one among several.)"""
    import shutil
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    path = _write_sweep(tmp_path, tiny_shards, algorithm="optuna", num_samples=2, asha=None, space={
        "model.adversary.weight": {"type": "loguniform", "low": 0.01, "high": 1.0}})
    base = yaml.safe_load(path.read_text())["set"]
    train = ["gdml", "train", *(a for k, v in base.items() if k != "train.val_fraction"
                                for a in ("--set", f"{k}={json.dumps(v)}"))]
    ray_tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must fit in 107 characters
    try:
        with _autoscaling_cluster(ray_tmp, tmp_path) as (address, gcs, config):
            where = ["--set", f"train.cluster_file={config}"]
            with ThreadPoolExecutor(3) as pool:  # side by side: the sweep's nodes and the GPU node are distinct
                never = pool.submit(_submit, address, gcs, *train, *where, "--set", "train.device=cpu",
                                    "--set", "train.workers=6", upload=True)
                sweep_job = pool.submit(_submit, address, gcs, "python", str(REPO / "tuning" / "sweep.py"),
                                        "--config", str(path), *where, "--set", "tune.folds=2",
                                        "--set", "train.val_fraction=0", "--set", "train.epochs=1",
                                        "--set", "train.device=cpu")
                gpu = pool.submit(_submit, address, gcs, *train, *where, "--set", "train.workers=1",
                                  "--set", "train.max_failures=0", "--set", "train.name=on-a-gpu-node",
                                  "--set", f"tracking.uri=sqlite:///{tmp_path / 'gpu.db'}")  # (not the sweep's)
                never, proc, gpu = never.result(), sweep_job.result(), gpu.result()
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    # more workers than the node types can ever hold: one line before any work, naming the key
    assert never.returncode != 0 and "gdml: config error: train.workers: 6 workers of 1 CPU each, but the cluster " \
        f"holds 5 at most (the node types of {config}); lower train.workers" in never.stdout, never.stdout[-3000:]
    assert "training on" not in never.stdout
    # train.device=auto on a cluster that can start GPU nodes: one GPU per worker, a GPU node started for it, and
    # the worker's torch (no CUDA here) refuses the GPU it was given in one line instead of training on the CPU
    assert gpu.returncode != 0 and "Ray gave this worker 1 GPU(s), but torch" in gpu.stdout, gpu.stdout[-3000:]
    assert "training on-a-gpu-node failed" in gpu.stdout
    assert "set train.device=cpu to train on the CPU" in gpu.stdout and "training on cpu" not in gpu.stdout
    # the sweep: nothing to run on at submit, so it said what it asked the autoscaler for, and then ran
    # (up now: nothing, or the GPU node if the run beside it got it started first)
    assert re.search(r"gdml: waiting for the autoscaler to start nodes: 4 worker\(s\) of 1 CPU each; up now: "
                     r"(nothing|1 CPU, 1 GPU) \(the most: 5 CPU, 1 GPU, the node types of ", proc.stdout), proc.stdout
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "succeeded" in proc.stdout and "2 trials" in proc.stdout and "(2 folds each)" in proc.stdout
    assert "mean ± standard error over 2 class-disjoint folds" in proc.stdout
    assert proc.stdout.count(" ± ") >= 3  # one per trial in the table, and the best
    assert "tested once on the unseen classes" in proc.stdout

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client, by_mode = _runs_by_mode(uri)
    parent, trials, folds = by_mode["sweep"][0], by_mode["tune-trial"], by_mode["tune-fold"]
    final = by_mode["sweep-final"][0]
    assert len(trials) == 2 and len(folds) == 4
    assert all(t.data.tags["mlflow.parentRunId"] == parent.info.run_id for t in [*trials, final])
    assert len({t.data.params["model.adversary.weight"] for t in trials}) == 2
    assert [t.data.tags.get("best") for t in trials].count("true") == 1
    for trial in trials:  # scored by the mean over its folds, each fold's run validated on its own fold
        m = trial.data.metrics
        mean, se = sweep.fold_summary([m["fold0/val/recall_at_1"], m["fold1/val/recall_at_1"]])
        assert m["val/recall_at_1"] == pytest.approx(mean) and m["val/recall_at_1_se"] == pytest.approx(se)
        mine = [f for f in folds if f.data.tags["mlflow.parentRunId"] == trial.info.run_id]
        assert sorted(f.data.params["tune.fold"] for f in mine) == ["0", "1"]
        for f in mine:
            own = m[f"fold{f.data.params['tune.fold']}/val/recall_at_1"]
            assert f.data.metrics["val/recall_at_1"] == pytest.approx(own)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"sweep_results.yaml", "trials.txt"} <= artifacts
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "plots")] == ["plots/sweep_params.png"]
    assert "test/recall_at_1" in final.data.metrics and final.data.params["train.val_fraction"] == "0.0"
    assert final.data.params["tune.folds"] == "1"
    assert "val/recall_at_1" not in final.data.metrics  # the final run never sees validation splits
    assert parent.data.metrics["final_test/recall_at_1"] == final.data.metrics["test/recall_at_1"]
    # the logged test number is the final checkpoint's: evaluated again here, in this process
    from pipeline.checkpoint import checkpoint_config, load_checkpoint
    from pipeline.data.shards import load_manifest
    from pipeline.evaluation.run import evaluate_checkpoint
    from pipeline.tracking import download_checkpoint

    checkpoint = download_checkpoint(uri, final.info.run_id, tmp_path / "final")
    cfg = checkpoint_config(load_checkpoint(checkpoint), checkpoint)
    again = evaluate_checkpoint(checkpoint, cfg, load_manifest(tiny_shards), "test", progress=False).metrics
    assert again["recall_at_1"] == pytest.approx(final.data.metrics["test/recall_at_1"], abs=1e-6)
    assert again["map_at_r"] == pytest.approx(final.data.metrics["test/map_at_r"], abs=1e-6)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(300)
def test_asha_stops_a_trial_at_its_first_rung_and_the_stopped_trial_trains_no_further(tmp_path, tiny_shards,
                                                                                      shared_ray):
    """A 2-trial grid, one trial at a time, ASHA with rungs at epochs 1 (halving) and 2. The sweep is scored on a
    metric whose order is known before any training (lambda at epoch 1 grows with the adversary's weight), so that
    which trial ASHA stops does not hang on what one epoch of a tiny model learns: the second trial (weight 0.05)
    is stopped at its first rung. Its workers wait at the epoch gate until Tune lets epoch 2 start, which for a
    stopped trial never comes: once every Ray process is gone, epoch 1 is its newest checkpoint and its only
    logged epoch (rank 0 drains its MLflow queue before it waits), and its run is closed as stopped by ASHA."""
    from pipeline.checkpoint import load_latest
    from tests.conftest import shutdown_ray_and_wait

    path = _write_sweep(tmp_path, tiny_shards, algorithm="grid", metric="adv_lambda", max_concurrent=1,
                        asha={"grace_period": 1, "reduction_factor": 2},
                        space={"model.adversary.weight": {"type": "grid", "values": [0.5, 0.05]}})
    spec, base = sweep.load_spec(path, ["train.epochs=2"])
    spec = spec.model_copy(update={"final": False})
    summary = sweep.run(spec, base, progress=False)
    shutdown_ray_and_wait()  # no process of the stopped trial is left that could still train or write

    epochs_run = {row["params"]["model.adversary.weight"]: row["epochs"] for row in summary["table"]}
    assert epochs_run == {0.5: 2, 0.05: 1} and summary["trial_epochs"] == 3
    assert summary["best_params"] == {"model.adversary.weight": 0.5}
    client, by_mode = _runs_by_mode(f"sqlite:///{tmp_path / 'mlflow.db'}")
    trials = {t.data.params["model.adversary.weight"]: t for t in by_mode["tune-trial"]}
    stopped, kept = trials["0.05"], trials["0.5"]
    assert stopped.data.tags.get("stopped_by") == "asha" and stopped.info.status == "KILLED"
    assert kept.data.tags["best"] == "true" and kept.info.status == "FINISHED" and "stopped_by" not in kept.data.tags
    for run, epochs in ((stopped, [1]), (kept, [1, 2])):
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val/recall_at_1")] == epochs
        latest = load_latest(base.train.storage_path, run.data.tags["gdml.run_name"])
        assert latest is not None and latest[1]["epoch"] == epochs[-1]
    # a trial's data sets: the training classes it trained on and the held-out ones it was scored on
    inputs = {next(t.value for t in d.tags if t.key == "mlflow.data.context"): json.loads(d.dataset.profile)
              for d in kept.inputs.dataset_inputs}
    assert {k: v["classes"] for k, v in inputs.items()} == {"training": 18, "validation": 6}  # 24 x 0.25 held out


def test_set_values_keep_their_yaml_types(tmp_path, tiny_shards):
    path = _write_sweep(tmp_path, tiny_shards)
    spec = yaml.safe_load(path.read_text())
    spec["set"].update({"model.attention.taps": None, "model.attention.kind": "cbam", "train.val_fraction": 0.3})
    path.write_text(yaml.safe_dump(spec))
    _, base = sweep.load_spec(path)
    assert base.model.attention.taps is None and base.model.attention.kind == "cbam"
    assert base.train.val_fraction == 0.3 and base.data.root == str(tiny_shards)


def test_set_reaches_the_sweeps_own_keys_as_well_as_the_base_configs(tmp_path, tiny_shards):
    path = _write_sweep(tmp_path, tiny_shards)
    spec, base = sweep.load_spec(path, ["search.num_samples=3", "search.asha.reduction_factor=2", "final=false",
                                        "train.epochs=4"])
    assert (spec.search.num_samples, spec.search.asha.reduction_factor, spec.final) == (3, 2.0, False)
    assert base.train.epochs == 4
    with pytest.raises(ConfigError, match="search.num_sample"):
        sweep.load_spec(path, ["search.num_sample=3"])
