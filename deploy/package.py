"""Package a trained model with its gallery index as a registered MLflow pyfunc model.

The gallery (a split of the shards) is embedded once; its FAISS index is exact (``IndexFlatIP``) below
``ivf_threshold`` items and inverted-file (``IndexIVFFlat``, nlist ~ 4 sqrt(n)) above it. The model is logged
*from code* (``deploy/retrieval_model.py``): the artifacts are the checkpoint (weights + config, which holds
the preprocessing), the index, and the id -> label/path map; no Python object is pickled.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MODEL_CODE = Path(__file__).resolve().parent / "retrieval_model.py"


@dataclass
class Packaged:
    model_uri: str
    registered: str
    version: str
    index_kind: str
    gallery_size: int


def build_index(embeddings: np.ndarray, ivf_threshold: int = 50_000, nlist: int | None = None,
                nprobe: int = 16, seed: int = 0):
    """(index, kind): exact inner product below the threshold, IVF above it."""
    import faiss

    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    d = x.shape[1]
    if len(x) < ivf_threshold:
        index = faiss.IndexFlatIP(d)
        index.add(x)
        return index, "flat"
    nlist = nlist or max(1, int(4 * math.sqrt(len(x))))
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.train(x)
    index.add(x)
    index.nprobe = nprobe
    return index, "ivf"


def gallery_from_split(checkpoint: str, split: str, data_root: str | None = None):
    """(model config, embeddings, labels, paths) of a split of the shards the model was trained with."""
    from pipeline.data import shards
    from pipeline.evaluate import embed_split
    from pipeline.train import load_model

    model, cfg, _ = load_model(checkpoint)
    root = data_root or cfg.data.root
    manifest = shards.load_manifest(root)
    emb, labels, keys = embed_split(model, manifest, root, split, cfg.eval.batch_size, image_size=cfg.data.image_size)
    names = {c["id"]: c["name"] for c in manifest["classes"]}
    return cfg, emb, [names.get(int(lab), str(lab)) for lab in labels], keys


def _requirements() -> list[str]:
    from importlib.metadata import requires, version

    reqs = [r.split(";")[0].strip() for r in (requires("gdml") or []) if "extra" not in r]
    return [*reqs, f"faiss-cpu=={version('faiss-cpu')}"]


def package(checkpoint: str, name: str, alias: str = "champion", split: str = "test", data_root: str | None = None,
            tracking_uri: str | None = None, experiment: str = "gdml-models", ivf_threshold: int = 50_000,
            nlist: int | None = None, nprobe: int = 16, source_run: str | None = None) -> Packaged:
    """Embed the gallery, build its index, log the pyfunc model, register it and point ``alias`` at it."""
    import faiss
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient

    from pipeline import tracking

    cfg, emb, labels, paths = gallery_from_split(checkpoint, split, data_root)
    index, kind = build_index(emb, ivf_threshold, nlist, nprobe, cfg.train.seed)
    uri = tracking_uri or tracking.resolve_uri(cfg.tracking)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with tempfile.TemporaryDirectory(prefix="gdml-package-") as tmp:
        faiss.write_index(index, f"{tmp}/gallery.index")
        Path(f"{tmp}/gallery.json").write_text(json.dumps({"labels": labels, "paths": paths,
                                                           "nprobe": nprobe if kind == "ivf" else None}))
        example = pd.DataFrame({"image": ["<base64 image>"]})
        output = [{"ids": [0], "labels": ["x"], "paths": ["x"], "scores": [1.0]}]
        signature = infer_signature(example, output, params={"k": 5})
        exp_id = tracking.experiment_id(uri, experiment)
        with mlflow.start_run(experiment_id=exp_id, run_name=f"package-{name}",
                              tags={"gdml.source_run": source_run or "", "gdml.checkpoint": str(checkpoint)}):
            mlflow.log_params({"gallery_split": split, "gallery_size": len(labels), "index": kind,
                               "nprobe": nprobe if kind == "ivf" else "", "embedding_size": emb.shape[1]})
            info = mlflow.pyfunc.log_model(
                name="retrieval",
                python_model=str(MODEL_CODE),
                artifacts={"checkpoint": str(checkpoint), "index": f"{tmp}/gallery.index",
                           "gallery": f"{tmp}/gallery.json"},
                code_paths=[str(Path(__file__).resolve().parent.parent / "pipeline")],
                signature=signature,
                pip_requirements=_requirements(),
                registered_model_name=name,
            )
    client = MlflowClient(uri)
    version = str(info.registered_model_version)
    client.set_registered_model_alias(name, alias, version)
    return Packaged(f"models:/{name}@{alias}", name, version, kind, len(labels))


def query(model_uri: str, images: list[bytes], k: int = 5) -> list[dict[str, Any]]:
    """Top-k gallery items for each image, through the packaged model (in this process)."""
    import base64

    import mlflow
    import pandas as pd

    model = mlflow.pyfunc.load_model(model_uri)
    frame = pd.DataFrame({"image": [base64.b64encode(b).decode() for b in images]})
    return model.predict(frame, params={"k": k})
