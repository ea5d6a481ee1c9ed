"""Package a trained model with its gallery, serve it with `mlflow models serve`, and send it good and bad input."""

import base64
import io
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import requests
from PIL import Image

from deploy.package import package, query
from pipeline.data import shards
from pipeline.evaluation.index import serving_index
from tests.conftest import free_port, stop_process_group, wait_for


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _test_image(root):
    """The first test-split image's bytes (it is in the gallery, so it must find itself)."""
    manifest = shards.load_manifest(root)
    first = manifest.shards("test")[0]
    with tarfile.open(root / first["file"]) as tar:
        name = sorted(n for n in tar.getnames() if n.endswith(".png"))[0]
        return tar.extractfile(name).read(), manifest.data["classes"][first["groups"][0][0]]["name"]


@pytest.fixture(scope="module")
def packaged(tmp_path_factory, trained):
    """The session's trained model, packaged with its test split as the gallery into the tracking server's
    registry."""
    tmp = tmp_path_factory.mktemp("deploy")
    done = package(trained.result.checkpoint, "tiny-retrieval", tracking_uri=trained.result.tracking_uri)
    return done, trained.result.tracking_uri, tmp


@pytest.mark.slow
def test_package_registers_an_exact_index_and_queries_find_the_image_itself(packaged, tiny_shards, monkeypatch):
    done, uri, _ = packaged
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert done.model_uri == "models:/tiny-retrieval@champion" and done.index_kind == "flat"
    assert done.gallery_size == shards.load_manifest(tiny_shards).images("test")
    image, label = _test_image(tiny_shards)
    [result] = query(done.model_uri, [image], k=3)
    assert result["labels"][0] == label and result["scores"][0] == pytest.approx(1.0, abs=1e-4)
    assert len(result["ids"]) == 3 and result["scores"] == sorted(result["scores"], reverse=True)


def test_ivf_above_the_threshold_keeps_recall():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(60, 16))
    x = (centers[rng.integers(0, 60, 3000)] + 0.3 * rng.normal(size=(3000, 16))).astype(np.float32)  # clustered
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    exact, kind = serving_index(x, ivf_threshold=10_000)
    ivf, kind_ivf = serving_index(x, ivf_threshold=1000, nprobe=16)
    assert (kind, kind_ivf) == ("flat", "ivf")
    _, a = exact.search(x[:200], 10)
    _, b = ivf.search(x[:200], 10)
    recall = np.mean([len(set(p) & set(q)) / 10 for p, q in zip(a, b)])
    assert recall > 0.9


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_served_model_answers_good_input_and_rejects_bad_input_clearly(packaged, tiny_shards):
    done, uri, tmp = packaged
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", done.model_uri, "--env-manager", "local",
         "-p", str(port), "--host", "127.0.0.1"],
        # The server runs `uvicorn` from PATH: the environment's bin directory must be on it.
        env={**os.environ, "MLFLOW_TRACKING_URI": uri,
             "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"},
        stdout=open(tmp / "serve.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert server.poll() is None, f"server exited: {(tmp / 'serve.log').read_text()[-2000:]}"
        try:
            return requests.get(f"{url}/ping", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_for(ready, 180, f"the served model at {url} to answer /ping", interval=0.5)
        image, label = _test_image(tiny_shards)

        def ask(images, **params):
            body = {"dataframe_records": [{"image": i} for i in images]}
            if params:
                body["params"] = params
            return requests.post(f"{url}/invocations", json=body, timeout=60)

        good = base64.b64encode(image).decode()
        r = ask([good], k=2)
        assert r.status_code == 200, r.text
        [pred] = r.json()["predictions"]
        assert pred["labels"][0] == label and len(pred["ids"]) == 2

        truncated = base64.b64encode(image[: len(image) // 2]).decode()
        not_image = base64.b64encode(b"hello, not an image").decode()
        bomb = base64.b64encode(_png(Image.new("1", (12000, 12000)))).decode()  # 144 Mpx, a few hundred KB
        r = ask([not_image, truncated, bomb, "%%%", good], k=1)
        assert r.status_code == 200, r.text
        preds = r.json()["predictions"]
        assert preds[0]["error"].startswith("row 0: not a readable image")
        assert preds[1]["error"].startswith("row 1: not a readable image")
        assert "exceeds the limit" in preds[2]["error"]
        assert preds[3]["error"] == "row 3: not valid base64"
        assert preds[4]["labels"][0] == label  # the good row still gets its answer

        for k in (0, 10_000):
            r = ask([good], k=k)
            assert r.status_code == 200 and r.json()["predictions"][0]["error"].startswith("k must be an integer")
        r = ask([good], k="three")
        message = r.json()["message"]
        assert r.status_code == 400 and "'k'" in message and "three" in message, message  # the signature refuses it
        r = requests.post(f"{url}/invocations", json={"dataframe_records": []}, timeout=60)
        # an empty request is refused by the model's signature before it reaches the model
        assert r.status_code == 400 and "Model is missing inputs ['image']" in r.json()["message"], r.text

        r = ask([good], k=1)  # still serving
        assert r.status_code == 200 and r.json()["predictions"][0]["labels"][0] == label
    finally:
        stop_process_group(server)


def test_served_requirements_name_the_installed_faiss_build(monkeypatch):
    from deploy import package as package_mod
    from pipeline.evaluation import index

    monkeypatch.setattr(index, "faiss_distribution", lambda: ("faiss-gpu", "1.15.1"))  # the gpu extra
    reqs = package_mod.requirements()
    assert "faiss-gpu==1.15.1" in reqs and not any(r.startswith("faiss-cpu") for r in reqs)
    assert any(r.startswith("torch") for r in reqs)
    monkeypatch.setattr(index, "faiss_distribution", lambda: None)
    with pytest.raises(RuntimeError, match="packaging a model needs FAISS"):
        package_mod.requirements()
