"""The Ray that gdml starts keeps Ray's token authentication: its dashboard and Jobs API (which run code) refuse a
client without the token, and training runs under it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import json, os, sys
import ray, requests
from pipeline.console import init_ray
from pipeline.launch import fit
from pipeline.config import load
from pipeline.tracking import Tracker

init_ray()
url = "http://" + ray._private.worker.get_dashboard_url()
without = requests.get(url + "/api/version", timeout=30).status_code
token = open(os.path.expanduser("~/.ray/auth_token")).read().strip()
with_token = requests.get(url + "/api/version", headers={"Authorization": "Bearer " + token}, timeout=30).status_code
_, history = fit(load(sys.argv[1]), Tracker(None, None), "auth", local=False, progress=False)
print(json.dumps({"without": without, "with": with_token, "epochs": [int(h["epoch"]) for h in history]}))
"""


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(240)
def test_a_ray_gdml_starts_refuses_a_client_without_the_token_and_trains_under_it(tmp_path, tiny_shards):
    from pipeline.preflight import resolve_paths

    cfg = resolve_paths(tiny_config(tmp_path, **{"data.root": str(tiny_shards), "train.workers": 1,
                                                 "train.max_steps_per_epoch": 1, "eval.gap_images": 0}))
    (tmp_path / "cfg.yaml").write_text(json.dumps(cfg.to_dict()))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env["HOME"] = str(tmp_path)  # the token Ray makes for a new local cluster goes to ~/.ray, here the test's own
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "cfg.yaml")], capture_output=True,
                          text=True, timeout=220, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"without": 401, "with": 200, "epochs": [1]}


def test_a_cluster_address_that_no_longer_answers_is_one_line_not_a_wait(tmp_path, tiny_cfg, monkeypatch, gdml,
                                                                          no_shared_ray):
    """``ray start`` recorded a cluster on this machine whose head is gone: gdml says which address, and the way
    out, instead of waiting in Ray's retry loop; nothing was trained or logged."""
    from tests.conftest import TINY, cli_args, free_port

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # where Ray looks for the recorded address: ray/ray_current_cluster
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
    overrides = {**TINY, "data.root": tiny_cfg.data.root, "train.storage_path": str(tmp_path / "runs"),
                 "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "train.workers": 1}
    proc = gdml("train", *cli_args(overrides), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "gdml: Ray: joining the cluster at 127.0.0.1:" in proc.stdout
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("gdml: no Ray cluster answers at 127.0.0.1:") and "`ray stop`" in line and "--local" in line
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()
