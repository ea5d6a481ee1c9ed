"""Package a trained model with its gallery index (exact below ``ivf_threshold`` items, IVF above) as a
registered MLflow pyfunc model, logged from code: no Python object is pickled.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL_CODE = Path(__file__).resolve().parent / "retrieval_model.py"


@dataclass
class Packaged:
    model_uri: str
    registered: str
    version: str
    index_kind: str
    gallery_size: int


def gallery_from_split(checkpoint: str, split: str, data_root: str | None = None):
    """(model config, embeddings, labels, paths) of a split of the shards the model was trained with."""
    from pipeline.checkpoint import load_model
    from pipeline.data import shards
    from pipeline.evaluation.embed import embed_split
    from pipeline.runtime import inference_device

    model, cfg, _ = load_model(checkpoint, inference_device())
    root = data_root or cfg.data.root
    manifest = shards.load_manifest(root)
    emb, labels, keys = embed_split(model, manifest.split(split), cfg.eval, cfg.data.image_size)
    names = manifest.names
    return cfg, emb, [names.get(int(lab), str(lab)) for lab in labels], keys


def _example_image(size: int) -> str:
    """A grey PNG of the model's input size, base64-encoded: the served model's input example."""
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (128, 128, 128)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def requirements() -> list[str]:
    """The served model's pip requirements: gdml's own, and whichever FAISS build is installed here."""
    from importlib.metadata import requires

    from pipeline.evaluation.index import faiss_distribution

    found = faiss_distribution()
    if found is None:
        raise RuntimeError("packaging a model needs FAISS: install gdml's extra 'cpu' (faiss-cpu) or 'gpu' (faiss-gpu)")
    reqs = [r.split(";")[0].strip() for r in (requires("gdml") or []) if "extra" not in r]
    return [*reqs, f"{found[0]}=={found[1]}"]


def package(checkpoint: str, name: str, alias: str = "champion", split: str = "test", data_root: str | None = None,
            tracking_uri: str | None = None, experiment: str = "gdml-models", ivf_threshold: int = 50_000,
            nlist: int | None = None, nprobe: int = 16, source_run: str | None = None) -> Packaged:
    """Embed the gallery, build its index, log the pyfunc model, register it and point ``alias`` at it."""
    import faiss
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    from pipeline import tracking
    from pipeline.evaluation.index import serving_index

    cfg, emb, labels, paths = gallery_from_split(checkpoint, split, data_root)
    index, kind = serving_index(emb, ivf_threshold, nlist, nprobe, cfg.train.seed)
    uri = tracking_uri or tracking.resolve_uri(cfg.tracking)
    with tempfile.TemporaryDirectory(prefix="gdml-package-") as tmp:
        faiss.write_index(index, f"{tmp}/gallery.index")
        Path(f"{tmp}/gallery.json").write_text(json.dumps({"labels": labels, "paths": paths,
                                                           "nprobe": nprobe if kind == "ivf" else None}))
        example = pd.DataFrame({"image": [_example_image(cfg.data.image_size)]})
        output = [{"ids": [0], "labels": ["x"], "paths": ["x"], "scores": [1.0]}]
        signature = infer_signature(example, output, params={"k": 5})
        run = tracking.Tracker.start(uri, experiment, f"package-{name}",
                                     tags={"gdml.source_run": source_run or "", "gdml.checkpoint": str(checkpoint)})
        run.log_params({"gallery_split": split, "gallery_size": len(labels), "index": kind,
                        "nprobe": nprobe if kind == "ivf" else "", "embedding_size": emb.shape[1]})
        with run, run.active():
            info = mlflow.pyfunc.log_model(
                name="retrieval",
                python_model=str(MODEL_CODE),
                artifacts={"checkpoint": str(checkpoint), "index": f"{tmp}/gallery.index",
                           "gallery": f"{tmp}/gallery.json"},
                code_paths=[str(Path(__file__).resolve().parent.parent / "pipeline")],
                signature=signature,
                input_example=(example, {"k": 5}),
                pip_requirements=requirements(),
                registered_model_name=name,
            )
    version = str(info.registered_model_version)
    # the registry is the tracking store (explicitly: a client made earlier may have resolved another default)
    mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri).set_registered_model_alias(name, alias, version)
    return Packaged(f"models:/{name}@{alias}", name, version, kind, len(labels))


def query(model_uri: str, images: list[bytes], k: int = 5) -> list[dict[str, Any]]:
    """Top-k gallery items for each image, through the packaged model (in this process)."""
    import base64

    import mlflow
    import pandas as pd

    model = mlflow.pyfunc.load_model(model_uri)
    frame = pd.DataFrame({"image": [base64.b64encode(b).decode() for b in images]})
    return model.predict(frame, params={"k": k})
