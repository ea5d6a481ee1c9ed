"""The served retrieval model, logged to MLflow from code: embedder + gallery index. Input: a DataFrame with
base64 ``image``s and parameter ``k``; output per row ``{"ids", "labels", "paths", "scores"}`` or ``{"error"}``.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import warnings
from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

MAX_PIXELS = 40_000_000
"""Images above this many pixels are refused (decompression bombs); a 6000x6000 photo still passes."""
MAX_K = 1000


def decode_image(text: Any, max_pixels: int = MAX_PIXELS):
    """A base64 string -> an RGB PIL image, or ValueError with a one-line reason."""
    from PIL import Image

    if not isinstance(text, str) or not text:
        raise ValueError("expected a base64-encoded image string")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64") from None
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height > max_pixels:
                    raise ValueError(f"image of {im.width}x{im.height} pixels exceeds the limit of {max_pixels}")
                im.load()
                return im.convert("RGB")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ValueError(f"image exceeds the limit of {max_pixels} pixels (decompression bomb)") from None
        except ValueError:
            raise
        except Exception as err:  # noqa: BLE001 - Pillow raises many types for broken files
            raise ValueError(f"not a readable image ({type(err).__name__}: {str(err)[:80]})") from None
        finally:
            Image.MAX_IMAGE_PIXELS = old


class RetrievalModel(PythonModel):
    def load_context(self, context) -> None:  # noqa: ANN001 - MLflow's signature
        import faiss
        import torch

        from pipeline.checkpoint import load_model
        from pipeline.data.transforms import eval_transform
        from pipeline.runtime import inference_device

        torch.set_num_threads(max(1, torch.get_num_threads()))
        self.device = inference_device()
        self.model, cfg, _ = load_model(context.artifacts["checkpoint"], self.device)
        self.transform = eval_transform(cfg.data.image_size)
        self.index = faiss.read_index(context.artifacts["index"])
        gallery = json.loads(open(context.artifacts["gallery"]).read())
        self.labels, self.paths = gallery["labels"], gallery["paths"]
        self.nprobe = gallery.get("nprobe")
        if self.nprobe and hasattr(self.index, "nprobe"):
            self.index.nprobe = self.nprobe

    def _embed(self, images: list) -> np.ndarray:
        import torch

        with torch.no_grad():
            batch = torch.stack([self.transform(im) for im in images]).to(self.device)
            emb, _ = self.model(batch)
        return np.ascontiguousarray(emb.float().cpu().numpy())

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:  # noqa: ANN001
        k = (params or {}).get("k", 5)
        rows = list(model_input["image"]) if "image" in getattr(model_input, "columns", []) else []
        if not rows:
            return [{"error": "empty request: send at least one row with an 'image' column (base64)"}]
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= min(MAX_K, self.index.ntotal):
            return [{"error": f"k must be an integer from 1 to {min(MAX_K, self.index.ntotal)}, got {k!r}"}] * len(rows)
        results: list[dict[str, Any]] = [{} for _ in rows]
        good, images = [], []
        for i, text in enumerate(rows):
            try:
                images.append(decode_image(text))
                good.append(i)
            except ValueError as err:
                results[i] = {"error": f"row {i}: {err}"}
        if good:
            scores, ids = self.index.search(self._embed(images), int(k))
            for row, s, idx in zip(good, scores, ids):
                keep = idx >= 0
                results[row] = {
                    "ids": [int(j) for j in idx[keep]],
                    "labels": [self.labels[j] for j in idx[keep]],
                    "paths": [self.paths[j] for j in idx[keep]],
                    "scores": [round(float(x), 6) for x in s[keep]],
                }
        return results


mlflow.models.set_model(RetrievalModel())
