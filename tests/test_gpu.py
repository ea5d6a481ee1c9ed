"""The GPU path on a CUDA machine: training at any world size, validation, evaluation, metrics, packaging and
serving all on the one device. Skipped without CUDA; ``make gpu-check`` runs them on a GPU."""

import json

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.launch import train_and_evaluate

pytestmark = pytest.mark.gpu


def _traced_run(tiny_cfg, tmp_path, monkeypatch, local: bool):
    from pipeline import launch

    trace = tmp_path / ("trace-local" if local else "trace-ray")
    trace.mkdir()
    from pipeline.train import Hooks

    real_fit = launch.fit

    def traced_fit(cfg, tracker, name, local, progress=True, hooks=None, epoch_gate=None, callbacks=None):
        return real_fit(cfg, tracker, name, local, progress, Hooks(trace_dir=str(trace)), epoch_gate, callbacks)

    monkeypatch.setattr(launch, "fit", traced_fit)
    train = tiny_cfg.train.model_copy(update={"workers": 1, "epochs": 1, "val_fraction": 0.25,
                                              "name": f"gpu-{'local' if local else 'ray'}"})
    result = train_and_evaluate(tiny_cfg.model_copy(update={"train": train}), local=local, progress=False,
                                plots=False)
    return result, json.loads((trace / "rank0-devices.json").read_text())


@pytest.mark.parametrize("local", [True, False], ids=["local", "one-ray-worker"])
def test_every_parameter_batch_and_evaluation_runs_on_cuda(tiny_cfg, tmp_path, monkeypatch, local):
    import ray

    try:
        result, devices = _traced_run(tiny_cfg, tmp_path, monkeypatch, local)
    finally:
        ray.shutdown()
    assert devices["decided"].startswith("cuda")
    assert devices["parameters"] == [devices["decided"]] and devices["batches"] == [devices["decided"]]
    assert devices["validation"] == devices["decided"]
    params = MlflowClient(result.tracking_uri).get_run(result.run_id).data.params
    assert params["runtime.device"].startswith("cuda") and params["runtime.eval_device"].startswith("cuda")
    assert "bf16" in params["runtime.describe"] or "fp16" in params["runtime.describe"]


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
    first = manifest["splits"]["test"]["shards"][0]["file"]
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
