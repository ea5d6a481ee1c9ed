"""The CLI end to end on a trained checkpoint: eval --checkpoint, package, query, shards verify; bad input."""

import os
import shutil
import subprocess
import sys
import tarfile

import pytest
from mlflow.tracking import MlflowClient

from pipeline.data import shards
from pipeline.launch import train_and_evaluate
from tests.conftest import tiny_config


def gdml(*args, cwd=None, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_shards):
    tmp = tmp_path_factory.mktemp("cli")
    cfg = tiny_config(tmp, **{"data.root": str(tiny_shards), "train.max_steps_per_epoch": 2})
    result = train_and_evaluate(cfg, local=True, progress=False, plots=False)
    return result, tmp


@pytest.mark.slow
def test_eval_package_and_query_through_the_cli(trained, tiny_shards):
    result, tmp = trained
    env = {"MLFLOW_TRACKING_URI": result.tracking_uri}
    proc = gdml("eval", "--checkpoint", result.checkpoint, "--no-plots", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines() if line.strip()}
    assert float(rows["recall_at_1"][0]) == pytest.approx(result.metrics["recall_at_1"], abs=5e-5)  # recomputed
    assert rows["skipped"] == ["images", "0"]

    proc = gdml("package", "--checkpoint", result.checkpoint, "--name", "cli-retrieval", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "registered cli-retrieval version 1 (flat index over 48 gallery images)" in proc.stdout
    first = shards.load_manifest(tiny_shards)["splits"]["test"]["shards"][0]["file"]
    with tarfile.open(tiny_shards / first) as tar:
        name = sorted(n for n in tar.getnames() if n.endswith(".png"))[0]
        (tmp / "query.png").write_bytes(tar.extractfile(name).read())
    proc = gdml("query", tmp / "query.png", "--model", "models:/cli-retrieval@champion", "-k", "2", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    answers = proc.stdout.splitlines()
    assert answers[0].endswith("query.png") and answers[1].strip().startswith("1.  1.0000")

    proc = gdml("query", tmp / "query.png", "--model", "models:/no-such-model@champion", env=env)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("gdml: --model models:/no-such-model@champion:")


@pytest.mark.slow
def test_unreadable_test_images_are_counted_printed_and_over_the_limit_an_error(trained, tiny_shards, tmp_path):
    result, _ = trained
    root = tmp_path / "broken"
    shutil.copytree(tiny_shards, root)
    test = shards.load_manifest(root)["splits"]["test"]["shards"][0]["file"]
    with tarfile.open(root / test) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(root / test, "w") as tar:
        broken = 0
        for member, data in members:
            if member.name.endswith(".png") and broken < 1:
                data, broken = b"not an image", 1
                member.size = len(data)
            tar.addfile(member, __import__("io").BytesIO(data))
    env = {"MLFLOW_TRACKING_URI": result.tracking_uri}
    # 1) checked: the shard no longer matches its manifest
    count = sum(len(s["shards"]) for s in shards.load_manifest(root)["splits"].values())
    proc = gdml("shards", "verify", root)
    assert proc.returncode == 1 and proc.stderr.startswith(f"1 of {count} shards differ from their manifest"), proc.stderr
    proc = gdml("eval", "--checkpoint", result.checkpoint, "--data-root", root, "--no-plots", env=env)
    last = proc.stderr.strip().splitlines()[-1]  # (after the progress bar): the error, one line
    assert proc.returncode == 1 and last.startswith("gdml: ") and "does not match the sha256 its manifest" in last
    assert gdml("shards", "verify", tiny_shards).returncode == 0
    # 2) not checked: the image is skipped, counted, printed and logged; over data.max_bad_fraction, an error
    from pipeline.checkpoint import load_checkpoint
    from pipeline.evaluation.run import TooManyUnreadable, evaluate_checkpoint

    cfg = tiny_config(tmp_path, **{"data.root": str(root), "data.verify": False, "data.max_bad_fraction": 0.05})
    manifest = shards.load_manifest(root)
    ev = evaluate_checkpoint(result.checkpoint, cfg, manifest, progress=False)
    assert ev.skipped == 1 and len(ev.labels) == manifest["splits"]["test"]["samples"] - 1
    strict = cfg.model_copy(update={"data": cfg.data.model_copy(update={"max_bad_fraction": 0.01})})
    with pytest.raises(TooManyUnreadable, match="1 of 48 images of the test split could not be read"):
        evaluate_checkpoint(result.checkpoint, strict, manifest, progress=False)
    assert load_checkpoint(result.checkpoint)["epoch"] == 1
    assert MlflowClient(result.tracking_uri).get_run(result.run_id).data.metrics["test/skipped_images"] == 0
