"""What a Ray cluster can hold, from its node types (an autoscaling cluster) or the nodes up now (a fixed one):
the GPU decision, a sweep's concurrency, and the one-line error for a run no node can ever hold."""

from pathlib import Path

import pytest
import yaml

from pipeline import cluster
from pipeline.config import ConfigError
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parent.parent


def _cfg(tmp_path, **values):
    return tiny_config(tmp_path, **values)


def test_the_launcher_file_gives_the_gpu_decision_and_the_most_the_cluster_holds(tmp_path):
    """ray_cluster.yaml as shipped: a CPU-0 head and up to 8 one-GPU workers, none up at submit."""
    nodes = cluster._node_types(ROOT / "ray_cluster.yaml")
    empty = cluster.Cluster({}, nodes, "ray_cluster.yaml")  # no worker node up yet
    cfg = _cfg(tmp_path, **{"train.workers": 2, "train.cpus_per_worker": 4})
    assert cluster.use_gpu(cfg, empty)  # train.device=auto: GPUs, because the cluster can start them
    assert empty.most == {"CPU": 64.0, "GPU": 8.0}
    assert cluster.check_fits(cfg, empty, runs=4) and not cluster.check_fits(cfg, empty, runs=5)  # 8 GPUs / 2
    assert not cluster.use_gpu(_cfg(tmp_path, **{"train.device": "cpu"}), empty)
    with pytest.raises(ConfigError, match=r"^train.workers: 9 workers of 1 CPU, 1 GPU each, but the cluster holds 8 "
                                          r"at most \(ray_cluster.yaml\); lower train.workers$"):
        cluster.check_fits(_cfg(tmp_path, **{"train.workers": 9}), empty)
    with pytest.raises(ConfigError, match=r"^train.cpus_per_worker: a worker needs 16 CPU, 1 GPU, more than any node "
                                          r"of the cluster has \(ray_cluster.yaml\); lower train.cpus_per_worker or "
                                          r"set train.device=cpu$"):
        cluster.check_fits(_cfg(tmp_path, **{"train.cpus_per_worker": 16}), empty)


def test_a_fixed_one_gpu_machine_refuses_two_gpu_workers_in_one_line(tmp_path):
    machine = cluster.Cluster({"CPU": 2.0, "GPU": 1.0}, [({"CPU": 2.0, "GPU": 1.0}, 1)], "the nodes up now")
    cfg = _cfg(tmp_path, **{"train.workers": 2})
    assert cluster.use_gpu(cfg, machine)
    with pytest.raises(ConfigError, match=r"^train.workers: 2 workers of 1 CPU, 1 GPU each, but the cluster holds 1 "
                                          r"at most"):
        cluster.check_fits(cfg, machine)
    assert cluster.check_fits(_cfg(tmp_path, **{"train.workers": 2, "train.device": "cpu"}), machine)
    cpu_only = cluster.Cluster({"CPU": 2.0}, [({"CPU": 2.0}, 1)], "the nodes up now")
    with pytest.raises(ConfigError, match=r"^train.device: cuda was asked for, but the Ray cluster has no GPU"):
        cluster.check_fits(_cfg(tmp_path, **{"train.device": "cuda"}), cpu_only)


def test_a_cluster_file_that_is_not_one_is_a_one_line_error(tmp_path):
    bad = tmp_path / "cluster.yaml"
    bad.write_text(yaml.safe_dump({"provider": {"type": "aws"}}))
    with pytest.raises(ConfigError, match=rf"^train.cluster_file: {bad} is not a Ray cluster config"):
        cluster._node_types(bad)
