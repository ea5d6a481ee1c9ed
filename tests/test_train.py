"""Training through the real worker function: local mode (one process) and Ray Train with 2 gloo workers."""

import json
import os
import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.checkpoint import CHECKPOINT_FILE, load_model
from pipeline.launch import train_and_evaluate

METRICS = {"recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "map_at_r", "r_precision", "precision_at_1",
           "nmi"}
PLOTS = {"plots/test_recall_at_k.png", "plots/test_retrieval.png", "plots/test_tsne.png", "plots/test_attention.png",
         "plots/test_worst_queries.png", "plots/generalisation_gap.png", "plots/adversary.png"}
DIAGNOSTICS = ("gap/seen_recall_at_1", "gap/unseen_recall_at_1", "gap/recall_at_1", "gap/map_at_r", "adv_acc",
               "adv_chance", "adv_lambda", "adv_grad_norm", "dml_grad_norm", "adv_grad_ratio")


def _check_mlflow(result, epochs):
    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert {f"test/{k}" for k in METRICS} <= set(run.data.metrics)
    history = client.get_metric_history(result.run_id, "loss_dml")
    assert [m.step for m in history] == list(range(1, epochs + 1))
    assert run.data.params["model.adversary.weight"] == "0.1"
    # the one device decision, logged by the worker and by the evaluation (a CPU machine: the CPU)
    assert run.data.params["runtime.device"] == "cpu" and run.data.params["runtime.eval_device"] == "cpu"
    assert run.data.params["runtime.describe"] == "cpu, float32"
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"checkpoint", "config.yaml", "test_per_class.csv"} <= artifacts
    for key in DIAGNOSTICS:  # every epoch
        assert [m.step for m in client.get_metric_history(result.run_id, key)] == list(range(1, epochs + 1)), key
    gap = run.data.metrics
    assert gap["gap/recall_at_1"] == pytest.approx(gap["gap/seen_recall_at_1"] - gap["gap/unseen_recall_at_1"])
    assert gap["adv_chance"] == pytest.approx(1 / 24) and gap["test/skipped_images"] == 0
    assert run.data.params["gap.unseen"].startswith("a fixed sample of up to 512 images of test classes")
    assert CHECKPOINT_FILE in {a.path.split("/")[-1] for a in client.list_artifacts(result.run_id, "checkpoint")}
    assert {a.path for a in client.list_artifacts(result.run_id, "plots")} == PLOTS


@pytest.mark.slow
def test_local_training_logs_metrics_and_a_safe_checkpoint(tiny_cfg):
    cfg = tiny_cfg.model_copy(update={"train": tiny_cfg.train.model_copy(update={"epochs": 2})})
    result = train_and_evaluate(cfg, local=True, progress=False)
    assert set(result.metrics) == METRICS
    assert all(0.0 <= v <= 1.0 for v in result.metrics.values())
    _check_mlflow(result, epochs=2)
    state = torch.load(f"{result.checkpoint}/{CHECKPOINT_FILE}", weights_only=True)  # no code executed
    assert state["epoch"] == 2
    model, loaded_cfg, _ = load_model(result.checkpoint)
    assert loaded_cfg.model == cfg.model and model.adversary is not None

    # gdml eval on the run: the same numbers again (one process, same data), plus the seen-class split.
    for split in ("test", "train"):
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "eval", "--run", result.run_id, "--split", split],
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "MLFLOW_TRACKING_URI": result.tracking_uri})
        assert proc.returncode == 0, proc.stderr[-2000:]
    # gdml eval recomputed the test metrics from the checkpoint: a second value in the history, the same number
    history = MlflowClient(result.tracking_uri).get_metric_history(result.run_id, "test/recall_at_1")
    assert len(history) == 2 and history[1].value == pytest.approx(history[0].value)
    run = MlflowClient(result.tracking_uri).get_run(result.run_id)
    assert "train/map_at_r" in run.data.metrics
    plots = {a.path for a in MlflowClient(result.tracking_uri).list_artifacts(result.run_id, "plots")}
    assert {"plots/train_retrieval.png", "plots/train_attention.png", "plots/train_worst_queries.png"} <= plots
    table = MlflowClient(result.tracking_uri).download_artifacts(result.run_id, "train_per_class.csv")
    lines = open(table).read().splitlines()
    assert lines[0] == "class_id,class_key,class_name,images,recall_at_1,map_at_r" and len(lines) == 1 + 24


@pytest.mark.slow
def test_local_fit_returns_the_last_epochs_metrics(tiny_cfg):
    """Local mode keeps no table of reports: fit still hands back the last epoch's (benchmarks read it)."""
    from pipeline.launch import fit
    from pipeline.tracking import Tracker

    cfg = tiny_cfg.model_copy(update={"train": tiny_cfg.train.model_copy(update={"epochs": 2})})
    checkpoint, history = fit(cfg, Tracker(None, None), "history", local=True, progress=False)
    assert checkpoint and len(history) == 1
    assert history[0]["epoch"] == 2 and history[0]["steps"] > 0 and history[0]["epoch_seconds"] > 0


@pytest.mark.slow
def test_training_reduces_the_metric_loss(tiny_cfg):
    train = tiny_cfg.train.model_copy(update={"epochs": 6, "lr": 3e-3, "lr_heads": 3e-3})
    model = tiny_cfg.model.model_copy(update={"adversary": tiny_cfg.model.adversary.model_copy(update={"enabled": False})})
    result = train_and_evaluate(tiny_cfg.model_copy(update={"train": train, "model": model}), local=True,
                                progress=False, plots=False)
    losses = [m.value for m in MlflowClient(result.tracking_uri).get_metric_history(result.run_id, "loss_dml")]
    assert losses[-1] < losses[0]


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(300)
def test_two_ray_workers_with_loader_workers_train_disjoint_data_and_log_to_mlflow(tiny_cfg, tmp_path, monkeypatch):
    """2 ranks x 2 loader worker processes, one strict pass per epoch (remainder=drop)."""
    import ray

    from pipeline import launch

    trace = tmp_path / "trace"
    trace.mkdir()
    real_fit = launch.fit

    def traced_fit(cfg, tracker, name, local, progress=True):
        # Same driver code, plus the worker's trace_dir option.
        return real_fit(cfg, tracker, name, local, progress, extra={"trace_dir": str(trace)})

    monkeypatch.setattr(launch, "fit", traced_fit)
    cfg = tiny_cfg.model_copy(update={
        "train": tiny_cfg.train.model_copy(update={"epochs": 2, "workers": 2}),
        "sampler": tiny_cfg.sampler.model_copy(update={"loader_workers": 2, "remainder": "drop"})})
    try:
        result = train_and_evaluate(cfg, local=False, progress=False)
    finally:
        ray.shutdown()
    _check_mlflow(result, epochs=2)
    for rank in (0, 1):
        devices = json.loads((trace / f"rank{rank}-devices.json").read_text())
        # rank 0 validates (val/* and gap/*); the other ranks wait at the report
        assert devices == {"decided": "cpu", "batches": ["cpu"], "parameters": ["cpu"],
                           "validation": "cpu" if rank == 0 else None}
    params = MlflowClient(result.tracking_uri).get_run(result.run_id).data.params
    assert params["runtime.loader_workers"] == "2" and params["sampler.epoch"] == "classes"
    epochs = []
    for epoch in (1, 2):
        per_rank = [json.loads((trace / f"rank{r}-epoch{epoch}.json").read_text()) for r in (0, 1)]
        # 24 classes, 2 ranks x 2 loader workers x P=4: one strict batch per loader worker, 2 steps per rank
        assert len(per_rank[0]) == len(per_rank[1]) == 2  # same steps on both ranks
        drawn = [c for batches in per_rank for batch in batches for c in set(batch)]
        assert len(drawn) == len(set(drawn)) == 16  # no class twice in the epoch, none shared by two ranks
        epochs.append(set(drawn))
    assert epochs[0] != epochs[1]  # the strict pass leaves out other classes each epoch


@pytest.mark.slow
@pytest.mark.parametrize("loss_name", ["contrastive", "triplet", "margin", "multi_similarity", "ntxent", "npairs",
                                       "proxy_nca", "proxy_anchor"])
def test_every_loss_trains_with_the_full_framework(tiny_cfg, loss_name):
    cfg = tiny_cfg.model_copy(update={
        "loss": tiny_cfg.loss.model_copy(update={"name": loss_name}),
        "train": tiny_cfg.train.model_copy(update={"max_steps_per_epoch": 2, "name": f"loss-{loss_name}"}),
    })
    assert cfg.model.attention.enabled and cfg.model.adversary.enabled
    result = train_and_evaluate(cfg, local=True, progress=False, plots=False)
    assert set(result.metrics) == METRICS
    state = torch.load(f"{result.checkpoint}/{CHECKPOINT_FILE}", weights_only=True)
    if loss_name.startswith("proxy"):
        assert state["loss"]["inner.proxies"].shape == (24, cfg.model.embedding_size)
    lrs = {g["name"]: g["lr"] for g in state["optimizer"]["param_groups"]}
    assert lrs["backbone"] == cfg.train.lr and lrs["adversary"] == cfg.train.lr_heads
    assert ("loss" in lrs) == loss_name.startswith("proxy")  # only proxy losses own parameters by default


@pytest.mark.slow
@pytest.mark.parametrize("backbone,taps", [("timm/test_vit", "[blocks.2,blocks.4]"),
                                           ("timm/convnext_atto", "[stages.1,stages.2]")])
def test_timm_backbones_train_and_evaluate_end_to_end(tiny_cfg, backbone, taps):
    from pipeline import config as config_mod

    cfg = config_mod.with_values(tiny_cfg, {"model.backbone": backbone, "model.attention.taps": taps.strip("[]")
                                            .split(","), "train.max_steps_per_epoch": 2, "train.name": backbone[5:]})
    result = train_and_evaluate(cfg, local=True, progress=False, plots=False)
    assert set(result.metrics) == METRICS and all(0 <= v <= 1 for v in result.metrics.values())
    model, _, _ = load_model(result.checkpoint)
    assert model.pool.taps == taps.strip("[]").split(",") and model.adversary is not None
