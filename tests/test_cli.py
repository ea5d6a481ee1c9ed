"""The CLI on the session's trained checkpoint: eval --checkpoint, package, query, shards verify; bad input.

The commands run in this process (``cli.main``: the same code as ``gdml ...`` without a second interpreter);
``tests/test_faults.py`` keeps one real subprocess for the exit code and the one-line message on stderr."""

import io
import re
import shutil
import tarfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline import cli
from pipeline.data import shards
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parent.parent


def gdml(capsys, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``gdml args...``."""
    code = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.slow
def test_eval_package_and_query_through_the_cli(trained, tiny_shards, monkeypatch, capsys):
    result, tmp = trained.result, trained.tmp
    monkeypatch.setenv("MLFLOW_TRACKING_URI", result.tracking_uri)
    code, out, err = gdml(capsys, "eval", "--checkpoint", result.checkpoint, "--no-plots")
    assert code == 0, err[-2000:]
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}
    assert float(rows["recall_at_1"][0]) == pytest.approx(result.metrics["recall_at_1"], abs=5e-5)  # recomputed
    assert rows["skipped"] == ["images", "0"]

    code, out, err = gdml(capsys, "package", "--checkpoint", result.checkpoint, "--name", "cli-retrieval")
    assert code == 0, err[-2000:]
    assert "registered cli-retrieval version 1 (flat index over 48 gallery images)" in out
    import mlflow

    info = mlflow.models.get_model_info("models:/cli-retrieval@champion")  # logged with an input example
    assert info.saved_input_example_info["type"] == "dataframe" and info.signature.params.to_dict()[0]["name"] == "k"
    first = shards.load_manifest(tiny_shards).shards("test")[0]["file"]
    with tarfile.open(tiny_shards / first) as tar:
        name = sorted(n for n in tar.getnames() if n.endswith(".png"))[0]
        (tmp / "query.png").write_bytes(tar.extractfile(name).read())
    code, out, err = gdml(capsys, "query", tmp / "query.png", "--model", "models:/cli-retrieval@champion", "-k", "2")
    assert code == 0, err[-2000:]
    answers = out.splitlines()
    assert answers[0].endswith("query.png") and answers[1].strip().startswith("1.  1.0000")

    code, out, err = gdml(capsys, "query", tmp / "query.png", "--model", "models:/no-such-model@champion")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("gdml: --model models:/no-such-model@champion:")


@pytest.mark.slow
def test_unreadable_test_images_are_counted_printed_and_over_the_limit_an_error(trained, tiny_shards, tmp_path,
                                                                               monkeypatch, capsys):
    result = trained.result
    root = tmp_path / "broken"
    shutil.copytree(tiny_shards, root)
    test = shards.load_manifest(root).shards("test")[0]["file"]
    with tarfile.open(root / test) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(root / test, "w") as tar:
        broken = 0
        for member, data in members:
            if member.name.endswith(".png") and broken < 1:
                data, broken = b"not an image", 1
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", result.tracking_uri)
    # 1) checked: the shard no longer matches its manifest
    count = sum(len(s["shards"]) for s in shards.load_manifest(root).data["splits"].values())
    code, _, err = gdml(capsys, "shards", "verify", root)
    assert code == 1 and err.startswith(f"1 of {count} shards differ from their manifest"), err
    code, _, err = gdml(capsys, "eval", "--checkpoint", result.checkpoint, "--data-root", root, "--no-plots")
    last = err.strip().splitlines()[-1]  # (after the progress bar): the error, one line
    assert code == 1 and last.startswith("gdml: ") and "does not match the sha256 its manifest" in last
    assert gdml(capsys, "shards", "verify", tiny_shards)[0] == 0
    # 2) not checked: the image is skipped, counted, printed and logged; over data.max_bad_fraction, an error
    from pipeline.checkpoint import load_checkpoint
    from pipeline.evaluation.run import TooManyUnreadable, evaluate_checkpoint

    cfg = tiny_config(tmp_path, **{"data.root": str(root), "data.verify": False, "data.max_bad_fraction": 0.05})
    manifest = shards.load_manifest(root)
    ev = evaluate_checkpoint(result.checkpoint, cfg, manifest, progress=False)
    assert ev.skipped == 1 and len(ev.labels) == manifest.images("test") - 1
    strict = cfg.model_copy(update={"data": cfg.data.model_copy(update={"max_bad_fraction": 0.01})})
    with pytest.raises(TooManyUnreadable, match="1 of 48 images of the test split could not be read"):
        evaluate_checkpoint(result.checkpoint, strict, manifest, progress=False)
    assert load_checkpoint(result.checkpoint)["epoch"] == 2
    assert MlflowClient(result.tracking_uri).get_run(result.run_id).data.metrics["test/skipped_images"] == 0


def test_version_and_help_speak_to_users(gdml):
    from importlib.metadata import version

    proc = gdml("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"gdml {version('gdml')}"
    proc = gdml("--help")
    assert proc.returncode == 0
    description = proc.stdout.split("\n\n")[1]  # after the usage lines
    assert description.startswith("gdml trains image embeddings that generalise to classes never seen")
    assert "gdml demo" in proc.stdout
    pages = re.findall(r"docs/[\w/-]+\.md", proc.stdout)  # where the docs are: pages that exist
    assert pages and all((ROOT / page).is_file() for page in pages), pages
