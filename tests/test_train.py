"""Training through the real worker function: local mode (one process) and Ray Train with 2 gloo workers."""

import json
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.checkpoint import CHECKPOINT_FILE, load_model
from pipeline.launch import train_and_evaluate
from tests.conftest import TRAINED_EPOCHS

ROOT = Path(__file__).resolve().parent.parent

METRICS = {"recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "map_at_r", "r_precision", "precision_at_1",
           "nmi"}
PLOTS = {"plots/test_recall_at_k.png", "plots/test_retrieval.png", "plots/test_tsne.png", "plots/test_attention.png",
         "plots/test_worst_queries.png", "plots/generalisation_gap.png", "plots/adversary.png"}
DIAGNOSTICS = ("gap/seen_recall_at_1", "gap/unseen_recall_at_1", "gap/recall_at_1", "gap/map_at_r", "adv_acc",
               "adv_chance", "adv_lambda", "adv_grad_norm", "dml_grad_norm", "adv_grad_ratio")


def check_mlflow(result, epochs, plots=PLOTS):
    """What every training run logs: status, test metrics, per-epoch history, params, artifacts, diagnostics."""
    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert {f"test/{k}" for k in METRICS} <= set(run.data.metrics)
    assert all(run.data.metrics[f"test/{k}"] == pytest.approx(v) for k, v in result.metrics.items())
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
    assert plots <= {a.path for a in client.list_artifacts(result.run_id, "plots")}
    check_view(client, run, held_out=0)


def check_view(client, run, held_out: int):
    """What the MLflow UI shows of a run: its experiment opens in the model-training view; the data set (shards,
    split, counts, context) in the Dataset column, the code in the Source column; system metrics."""
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    inputs = {next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset
              for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "test"} | ({"validation"} if held_out else set())
    profiles = {context: json.loads(d.profile) for context, d in inputs.items()}
    assert profiles["training"]["classes"] == 24 - held_out and profiles["test"]["classes"] == 24
    assert profiles["test"]["images"] == 48 and profiles["training"]["split"] == "train"
    assert all(d.source_type == "local" and json.loads(d.source)["uri"].startswith("file:///") and len(d.digest) == 16
               for d in inputs.values())
    tags = run.data.tags
    assert tags["gdml.version"] == version("gdml") and tags["mlflow.source.type"] == "LOCAL"
    if (ROOT / ".git").exists():
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
        assert tags["mlflow.source.git.commit"] == head.stdout.strip()
    system = {k for k in run.data.metrics if k.startswith("system/")}
    if run.data.params["tracking.system_metrics"] == "True":
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system, system
    else:
        assert not system


@pytest.mark.slow
def test_local_training_logs_metrics_and_a_safe_checkpoint_to_a_tracking_server(trained, monkeypatch, capsys):
    """The session's trained run (2 epochs, local mode, logged to a real MLflow server), then ``gdml eval --run``
    on it for both splits (in this process: the command's code, without a second interpreter)."""
    from pipeline import cli

    result, cfg = trained.result, trained.cfg
    assert result.tracking_uri.startswith("http://127.0.0.1:")
    assert set(result.metrics) == METRICS and all(0.0 <= v <= 1.0 for v in result.metrics.values())
    check_mlflow(result, epochs=TRAINED_EPOCHS)
    state = torch.load(f"{result.checkpoint}/{CHECKPOINT_FILE}", weights_only=True)  # no code executed
    assert state["epoch"] == TRAINED_EPOCHS
    model, loaded_cfg, _ = load_model(result.checkpoint)
    assert loaded_cfg.model == cfg.model and model.adversary is not None

    # gdml eval on the run: the same numbers again (one process, same data), plus the seen-class split
    monkeypatch.setenv("MLFLOW_TRACKING_URI", result.tracking_uri)
    client = MlflowClient(result.tracking_uri)
    before = len(client.get_metric_history(result.run_id, "test/recall_at_1"))
    for split in ("test", "train"):
        assert cli.main(["eval", "--run", result.run_id, "--split", split]) == 0
    out = capsys.readouterr().out
    assert f"logged to MLflow run {result.run_id} as train/<metric>" in out
    history = client.get_metric_history(result.run_id, "test/recall_at_1")
    assert len(history) == before + 1 and history[-1].value == pytest.approx(history[0].value)
    run = client.get_run(result.run_id)
    assert "train/map_at_r" in run.data.metrics
    plots = {a.path for a in client.list_artifacts(result.run_id, "plots")}
    assert {"plots/train_retrieval.png", "plots/train_attention.png", "plots/train_worst_queries.png"} <= plots
    table = client.download_artifacts(result.run_id, "train_per_class.csv", str(trained.tmp))
    lines = open(table).read().splitlines()
    assert lines[0] == "class_id,class_key,class_name,images,recall_at_1,map_at_r" and len(lines) == 1 + 24


@pytest.mark.slow
def test_training_learns_its_batches_and_fit_hands_back_the_last_epoch(tiny_cfg):
    """The training path learns: on two fixed batches (the worker's synthetic-batch mode, no decoding), the metric
    loss falls to a fraction of its first epoch's value. Local mode keeps no table of reports: fit still hands back
    the last epoch's (benchmarks read it)."""
    from pipeline import config as config_mod
    from pipeline.launch import fit
    from pipeline.tracking import Tracker
    from pipeline.train import Hooks

    cfg = config_mod.with_values(tiny_cfg, {"train.epochs": 8, "train.lr": 3e-3, "train.lr_heads": 3e-3,
                                            "model.adversary.enabled": False, "eval.gap_images": 0})
    with Tracker.start(cfg.tracking.uri, "tests", "learns") as tracker:
        checkpoint, history = fit(cfg, tracker, "learns", local=True, progress=False,
                                  hooks=Hooks(synthetic_batches=2))
    assert checkpoint and len(history) == 1
    assert history[0]["epoch"] == 8 and history[0]["steps"] == 2 and history[0]["epoch_seconds"] > 0
    losses = [m.value for m in sorted(MlflowClient(cfg.tracking.uri).get_metric_history(tracker.run_id, "loss_dml"),
                                      key=lambda m: m.step)]
    assert len(losses) == 8
    assert losses[-1] < 0.5 * losses[0], losses


def test_the_metric_loss_runs_in_float32_outside_mixed_precision():
    """Under autocast (bf16 here, on the CPU; fp16 or bf16 on a GPU) the embedder's output is low precision; the
    metric loss is computed outside autocast on float32 embeddings, the same value as a float32 step gives."""
    from pipeline.config import LossConfig
    from pipeline.objectives import MetricLoss, TrainModule

    class Embedder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(8, 4)

        def forward(self, images, lam):
            return torch.nn.functional.normalize(self.linear(images), dim=1), None

    torch.manual_seed(0)
    module = TrainModule(Embedder(), MetricLoss(LossConfig(), num_classes=3, embedding_size=4))
    seen = []
    module.metric_loss.register_forward_pre_hook(
        lambda _, args: seen.append((args[0].dtype, torch.is_autocast_enabled("cpu"))))
    images, labels = torch.randn(12, 8), torch.tensor([0, 1, 2] * 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, _ = module(images, labels)
        emb, _ = module.embedder(images, 0.0)
    assert emb.dtype == torch.bfloat16 and seen == [(torch.float32, False)] and loss.dtype == torch.float32
    assert loss.item() == module.metric_loss(emb.float(), labels).item()


def test_every_loss_takes_a_step_with_the_full_framework():
    """One optimisation step of the whole module (backbone, attention, adversary, loss) for every loss: finite
    terms, gradients reaching the backbone, the adversary and (proxy losses) the proxies, one learning rate per
    part. (End to end, through shards and MLflow: the ablation's losses, and the session's trained run.)"""
    from pipeline.config import Config, LossConfig
    from pipeline.model.embedder import Embedder
    from pipeline.objectives import LOSSES, MetricLoss, TrainModule
    from pipeline.train import build_optimizer
    from tests.model.test_embedder import model_cfg

    cfg = Config()
    images, labels = torch.randn(12, 3, 32, 32), torch.tensor([0, 1, 2, 3] * 3)
    for name in LOSSES:
        torch.manual_seed(0)
        module = TrainModule(Embedder(model_cfg("timm/test_resnet", taps=["layer2", "layer3"]), 4, image_size=32),
                             MetricLoss(LossConfig(name=name), 4, 16))
        optimizer = build_optimizer(module, cfg)
        before = {k: v.clone() for k, v in module.state_dict().items()}
        loss_dml, loss_adv, logits = module(images, labels, 0.5)
        assert torch.isfinite(loss_dml) and torch.isfinite(loss_adv) and logits.shape == (12, 4), name
        (loss_dml + loss_adv).backward()
        optimizer.step()
        after = module.state_dict()
        moved = {k for k in after if after[k].is_floating_point() and not torch.equal(after[k], before[k])}
        assert any(k.startswith("embedder.backbone.") for k in moved), name
        assert any(k.startswith("embedder.adversary.") for k in moved), name
        assert any(k.startswith("embedder.pool.") for k in moved), name
        assert ("metric_loss.inner.proxies" in moved) == name.startswith("proxy"), name
        lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
        assert lrs["backbone"] == cfg.train.lr and lrs["adversary"] == cfg.train.lr_heads, name
        assert ("loss" in lrs) == name.startswith("proxy"), name  # only proxy losses own parameters by default


@pytest.mark.full
@pytest.mark.slow
@pytest.mark.parametrize("loss_name", ["contrastive", "proxy_anchor"])
def test_a_pair_loss_and_a_proxy_loss_train_and_evaluate_end_to_end(tiny_cfg, loss_name):
    from pipeline import config as config_mod

    cfg = config_mod.with_values(tiny_cfg, {"loss.name": loss_name, "train.max_steps_per_epoch": 2,
                                            "train.name": f"loss-{loss_name}"})
    assert not cfg.tracking.system_metrics
    result = train_and_evaluate(cfg, local=True, progress=False, plots=False)
    assert set(result.metrics) == METRICS
    run = MlflowClient(result.tracking_uri).get_run(result.run_id)
    assert not any(k.startswith("system/") for k in run.data.metrics)  # tracking.system_metrics=false: none
    state = torch.load(f"{result.checkpoint}/{CHECKPOINT_FILE}", weights_only=True)
    if loss_name.startswith("proxy"):
        assert state["loss"]["inner.proxies"].shape == (24, cfg.model.embedding_size)
    assert ("loss" in {g["name"] for g in state["optimizer"]["param_groups"]}) == loss_name.startswith("proxy")


@pytest.mark.full
@pytest.mark.slow
@pytest.mark.parametrize("backbone,taps", [("timm/test_vit", ["blocks.2", "blocks.4"]),
                                           ("timm/convnext_atto", ["stages.1", "stages.2"])])
def test_timm_backbones_train_and_evaluate_end_to_end(tiny_cfg, backbone, taps):
    from pipeline import config as config_mod

    cfg = config_mod.with_values(tiny_cfg, {"model.backbone": backbone, "model.attention.taps": taps,
                                            "train.max_steps_per_epoch": 2, "train.name": backbone[5:]})
    result = train_and_evaluate(cfg, local=True, progress=False, plots=False)
    assert set(result.metrics) == METRICS and all(0 <= v <= 1 for v in result.metrics.values())
    model, _, _ = load_model(result.checkpoint)
    assert model.pool.taps == taps and model.adversary is not None


def check_two_rank_trace(trace, epochs: int) -> None:
    """What 2 ranks x 2 loader workers with remainder=drop trained on (a traced run, ``trace_dir``): the devices,
    the same steps on both ranks, no class twice in an epoch nor shared by the ranks, other classes each epoch."""
    for rank in (0, 1):
        devices = json.loads((trace / f"rank{rank}-devices.json").read_text())
        # rank 0 validates (val/* and gap/*); the other ranks wait at the report
        assert devices == {"backend": "gloo", "decided": "cpu", "batches": ["cpu"], "parameters": ["cpu"],
                           "validation": "cpu" if rank == 0 else None}
    drawn_per_epoch = []
    for epoch in range(1, epochs + 1):
        per_rank = [json.loads((trace / f"rank{r}-epoch{epoch}.json").read_text()) for r in (0, 1)]
        # 24 classes, 2 ranks x 2 loader workers x P=4: one strict batch per loader worker, 2 steps per rank
        assert len(per_rank[0]) == len(per_rank[1]) == 2
        drawn = [c for batches in per_rank for batch in batches for c in set(batch)]
        assert len(drawn) == len(set(drawn)) == 16
        drawn_per_epoch.append(set(drawn))
    assert drawn_per_epoch[0] != drawn_per_epoch[1]  # the strict pass leaves out other classes each epoch
