"""The GPU path on a CUDA machine: training at any world size, validation, evaluation, metrics, packaging and
serving all on the one device. Skipped without CUDA; ``make gpu-check`` runs them on a GPU."""

import json

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.launch import train_and_evaluate

pytestmark = pytest.mark.gpu


def _traced_run(tiny_cfg, tmp_path, monkeypatch, local: bool, workers: int = 1):
    from pipeline import config as config_mod
    from pipeline import launch
    from pipeline.train import Hooks

    name = "gpu-local" if local else f"gpu-ray-{workers}"
    trace = tmp_path / f"trace-{name}"
    trace.mkdir()
    real_fit = launch.fit

    def traced_fit(cfg, tracker, name, local, progress=True, hooks=None, epoch_gate=None, callbacks=None):
        return real_fit(cfg, tracker, name, local, progress, Hooks(trace_dir=str(trace)), epoch_gate, callbacks)

    monkeypatch.setattr(launch, "fit", traced_fit)
    cfg = config_mod.with_values(tiny_cfg, {"train.workers": workers, "train.epochs": 1, "train.val_fraction": 0.25,
                                            "train.name": name, "train.device": "cuda",
                                            "sampler.loader_workers": 2, "eval.loader_workers": 2})
    result = train_and_evaluate(cfg, local=local, progress=False, plots=False)
    return result, [json.loads((trace / f"rank{r}-devices.json").read_text()) for r in range(workers)]


@pytest.mark.parametrize("local", [True, False], ids=["local", "one-ray-worker"])
def test_every_parameter_batch_and_evaluation_runs_on_cuda(tiny_cfg, tmp_path, monkeypatch, local):
    """Loader workers (2) hand over pinned batches; parameters, batches and validation (embedded by 2 loader
    workers) are on the GPU; the run logs a GPU precision."""
    import ray

    try:
        result, [devices] = _traced_run(tiny_cfg, tmp_path, monkeypatch, local)
    finally:
        ray.shutdown()
    assert devices["decided"].startswith("cuda")
    assert devices["parameters"] == [devices["decided"]]
    assert devices["batches"] == sorted([devices["decided"], "pinned"])  # pinned host memory, copied to the GPU
    assert devices["validation"] == devices["decided"]
    params = MlflowClient(result.tracking_uri).get_run(result.run_id).data.params
    assert params["runtime.device"].startswith("cuda") and params["runtime.eval_device"].startswith("cuda")
    assert params["runtime.loader_workers"] == "2"
    assert "bf16" in params["runtime.describe"] or "fp16" in params["runtime.describe"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (NCCL cannot put two ranks on one)")
def test_two_ray_workers_train_with_nccl_ddp_a_distributed_loss_and_every_ranks_rng(tiny_cfg, tmp_path, monkeypatch):
    """2 Ray Train workers, one GPU each: NCCL between them, the metric loss over both ranks' embeddings (PML's
    distributed wrapper, whose all_gather the CPU tests check against a whole-batch step), and the checkpoint holds
    both ranks' RNG states (gathered with all_gather_object over NCCL), each with its own device's CUDA state."""
    import ray

    from pipeline.checkpoint import load_checkpoint

    try:
        result, ranks = _traced_run(tiny_cfg, tmp_path, monkeypatch, local=False, workers=2)
    finally:
        ray.shutdown()
    assert [d["backend"] for d in ranks] == ["nccl", "nccl"]
    assert ranks[0]["decided"] != ranks[1]["decided"] and all(d["decided"].startswith("cuda") for d in ranks)
    assert all(d["batches"] == sorted([d["decided"], "pinned"]) for d in ranks)
    per_rank = load_checkpoint(result.checkpoint)["rng_per_rank"]
    assert len(per_rank) == 2 and all(isinstance(r["cuda"], torch.Tensor) for r in per_rank)
    run = MlflowClient(result.tracking_uri).get_run(result.run_id).data
    assert run.params["runtime.world_size"] == "2" and run.params["runtime.device"].startswith("cuda")
    assert torch.isfinite(torch.tensor(run.metrics["loss_dml"])) and "test/recall_at_1" in run.metrics


def test_evaluation_embeds_under_autocast_and_channels_last_with_loader_workers(trained, tiny_shards):
    """On a GPU, embedding converts the model to channels_last and runs under the device's autocast; the
    embeddings come back float32 and equal, within the precision's error, to the float32 CPU ones."""
    import numpy as np

    from pipeline.checkpoint import load_model
    from pipeline.config import EvalConfig
    from pipeline.data.shards import load_manifest
    from pipeline.evaluation.embed import embed_split

    manifest = load_manifest(tiny_shards)
    cpu_model, cfg, _ = load_model(trained.result.checkpoint, torch.device("cpu"))
    gpu_model, _, _ = load_model(trained.result.checkpoint, torch.device("cuda"))
    ev = EvalConfig(batch_size=8, loader_workers=2)
    cpu = embed_split(cpu_model, manifest.split("test"), ev, cfg.data.image_size, progress=False)
    gpu = embed_split(gpu_model, manifest.split("test"), ev, cfg.data.image_size, progress=False)
    convs = [m.weight for m in gpu_model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert gpu[0].dtype == np.float32 and gpu[2] == cpu[2] and np.array_equal(gpu[1], cpu[1])
    assert np.abs(gpu[0] - cpu[0]).max() < 0.1  # bf16/fp16 autocast against float32, unit-norm embeddings
    assert not np.array_equal(gpu[0], cpu[0])  # (it did run in reduced precision)


@pytest.mark.parametrize("case", range(3))
def test_gpu_metrics_equal_the_cpu_engine_on_ties(case):
    from pipeline.evaluation.metrics import retrieval_metrics
    from tests.evaluation.test_metrics import _tie_cases

    emb, labels, g, gl = _tie_cases()[case]
    kwargs = {"gallery": g, "gallery_labels": gl, "recall_at": (1, 2, 4, 8, 100)}
    cpu = retrieval_metrics(emb, labels, device="cpu", **kwargs)
    for engine in ("ranks", "knn"):
        gpu = retrieval_metrics(emb, labels, device="cuda", engine=engine, **kwargs)
        assert {k: v for k, v in gpu.items() if k != "nmi"} == {k: v for k, v in cpu.items() if k != "nmi"}
        assert gpu["nmi"] == pytest.approx(cpu["nmi"], abs=1e-3)  # k-means: float32 near-ties may differ


def test_package_and_query_run_on_cuda(trained, tiny_shards):
    from deploy.package import package, query
    from pipeline.data import shards

    result = trained.result  # the session's trained model
    done = package(result.checkpoint, "gpu-retrieval", tracking_uri=result.tracking_uri)
    import mlflow

    mlflow.set_tracking_uri(result.tracking_uri)
    model = mlflow.pyfunc.load_model(done.model_uri).unwrap_python_model()
    assert model.device.type == "cuda" and next(model.model.parameters()).is_cuda
    manifest = shards.load_manifest(tiny_shards)
    first = manifest.shards("test")[0]["file"]
    import tarfile

    with tarfile.open(tiny_shards / first) as tar:
        image = tar.extractfile(sorted(n for n in tar.getnames() if n.endswith(".png"))[0]).read()
    [answer] = query(done.model_uri, [image], k=3)
    assert answer["scores"][0] == pytest.approx(1.0, abs=1e-3)


def test_a_training_step_runs_with_the_precision_chosen_for_this_gpu():
    """bf16 autocast where the GPU has it natively (compute capability 8.0 and up), else fp16 with loss scaling;
    channels_last; and a real optimisation step under that choice: finite loss, every trained weight moved."""
    from pipeline.config import Config, LossConfig
    from pipeline.model.embedder import Embedder
    from pipeline.objectives import MetricLoss, TrainModule
    from pipeline.runtime import Capabilities, choose, decide_device
    from pipeline.train import build_optimizer
    from tests.model.test_embedder import model_cfg

    caps = Capabilities.detect()
    run = choose(decide_device("auto", caps), caps)
    native_bf16 = torch.cuda.get_device_capability(run.device)[0] >= 8
    assert run.device.type == "cuda" and run.channels_last and run.pin_memory
    assert run.amp_dtype == (torch.bfloat16 if native_bf16 else torch.float16)
    assert run.grad_scaler == (run.amp_dtype == torch.float16)
    torch.manual_seed(0)
    module = TrainModule(Embedder(model_cfg("timm/test_resnet", taps=["layer2", "layer3"]), 4, image_size=32),
                         MetricLoss(LossConfig(), 4, 16)).to(run.device, memory_format=torch.channels_last)
    optimizer = build_optimizer(module, Config())
    scaler = torch.amp.GradScaler("cuda", enabled=run.grad_scaler)
    images = torch.randn(12, 3, 32, 32, device=run.device).contiguous(memory_format=torch.channels_last)
    labels = torch.tensor([0, 1, 2, 3] * 3, device=run.device)
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    for _ in range(3):  # (fp16: the scaler may skip a first step whose scaled gradients overflowed)
        optimizer.zero_grad()
        with run.autocast():
            loss_dml, loss_adv, logits = module(images, labels, 0.5)
        assert logits.dtype == run.amp_dtype  # the adversary's linear layers ran in the chosen precision
        loss = loss_dml.float() + loss_adv.float()
        assert torch.isfinite(loss)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    moved = [n for n, p in module.named_parameters() if p.grad is not None and not torch.equal(p, before[n])]
    assert any(n.startswith("embedder.backbone.") for n in moved) and any("adversary" in n for n in moved)
    assert all(torch.isfinite(p).all() for p in module.parameters())
