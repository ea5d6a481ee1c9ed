"""The served model answers a query without the training loop, Ray, pytorch-metric-learning or WebDataset."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import torch

from pipeline.checkpoint import TrainState, save_checkpoint
from pipeline.config import Config
from pipeline.evaluation.index import flat_index
from pipeline.model.embedder import Embedder
from pipeline.objectives import MetricLoss, TrainModule
from pipeline.train import build_optimizer
from tests.conftest import tiny_config

HEAVY = ("ray", "pipeline.train", "pipeline.launch", "pytorch_metric_learning", "webdataset")


def test_the_served_model_imports_neither_ray_nor_the_training_loop(tmp_path):
    import faiss

    cfg: Config = tiny_config(tmp_path)
    module = TrainModule(Embedder(cfg.model, 4, cfg.data.image_size), MetricLoss(cfg.loss, 4, cfg.model.embedding_size))
    state = TrainState(module, build_optimizer(module, cfg), torch.amp.GradScaler("cpu", enabled=False))
    save_checkpoint(tmp_path / "ckpt", state, cfg, 4, {})
    gallery = np.eye(cfg.model.embedding_size, dtype=np.float32)[:3]
    faiss.write_index(flat_index(gallery), str(tmp_path / "gallery.index"))
    (tmp_path / "gallery.json").write_text(json.dumps({"labels": ["a", "b", "c"], "paths": ["x", "y", "z"]}))
    script = textwrap.dedent(f"""
        import base64, io, json, sys
        from types import SimpleNamespace
        import pandas as pd
        from PIL import Image
        from deploy.retrieval_model import RetrievalModel
        model = RetrievalModel()
        model.load_context(SimpleNamespace(artifacts={{"checkpoint": {str(tmp_path / "ckpt")!r},
            "index": {str(tmp_path / "gallery.index")!r}, "gallery": {str(tmp_path / "gallery.json")!r}}}))
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, format="PNG")
        frame = pd.DataFrame({{"image": [base64.b64encode(buf.getvalue()).decode()]}})
        [answer] = model.predict(None, frame, {{"k": 2}})
        print(json.dumps({{"answer": answer, "modules": sorted(m for m in sys.modules if m.startswith({HEAVY!r}))}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["answer"]["ids"]) == 2
    assert out["modules"] == []
