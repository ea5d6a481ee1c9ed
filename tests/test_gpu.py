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
    real_fit = launch.fit

    def traced_fit(cfg, tracker, name, local, progress=True):
        return real_fit(cfg, tracker, name, local, progress, extra={"trace_dir": str(trace)})

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


def test_package_and_query_run_on_cuda(tmp_path, tiny_shards):
    from deploy.package import package, query
    from pipeline.data import shards
    from tests.conftest import tiny_config

    cfg = tiny_config(tmp_path, **{"data.root": str(tiny_shards), "train.max_steps_per_epoch": 2})
    result = train_and_evaluate(cfg, local=True, progress=False, plots=False)
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


def test_tiny_config_trains_with_amp_on_cuda():
    """The runtime choice for this GPU: bf16 where supported, else fp16 with a scaler; channels_last."""
    from pipeline.runtime import Capabilities, choose, decide_device

    caps = Capabilities.detect()
    run = choose(decide_device("auto", caps), caps)
    assert run.device.type == "cuda" and run.channels_last and run.pin_memory
    assert run.amp_dtype in (torch.bfloat16, torch.float16) and run.grad_scaler == (run.amp_dtype == torch.float16)
