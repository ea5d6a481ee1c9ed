import shlex
from pathlib import Path

import ray
import yaml

from tuning import sweep

ROOT = Path(__file__).resolve().parents[2]


def test_rayjob_manifest_has_the_required_fields_and_a_valid_entrypoint():
    job = yaml.safe_load((ROOT / "deploy" / "k8s" / "rayjob-sweep.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["rayClusterSpec"]["rayVersion"] == ray.__version__
    assert spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    workers = spec["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert workers["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # The entrypoint must parse with the sweep script's own argument parser and name real config keys.
    import argparse

    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "tuning/sweep.py"]
    parser = argparse.ArgumentParser(exit_on_error=False)
    sweep.add_arguments(parser)
    args = parser.parse_args(argv[2:])  # an unknown option or a missing value raises here
    assert (ROOT / args.config).is_file()
    spec_, base = sweep.load_spec(ROOT / args.config, args.overrides)
    assert base.train.device == "cuda" and base.train.storage_path.startswith("s3://")
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http") and "RAY_AUTH_MODE" not in env["env_vars"]
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    for container in (head, workers):  # token authentication on every node, the token from a secret
        auth = {e["name"]: e for e in container["env"]}
        assert auth["RAY_AUTH_MODE"]["value"] == "token" and "secretKeyRef" in auth["RAY_AUTH_TOKEN"]["valueFrom"]
