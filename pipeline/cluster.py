"""What a Ray cluster can hold, read from its node types (``train.cluster_file`` or
``~/ray_bootstrapped_config.yaml``), not from the nodes up now. Details: docs/internals.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Config, ConfigError

BOOTSTRAPPED = Path.home() / "ray_bootstrapped_config.yaml"
"""Where ``ray up`` leaves the cluster's config on its head node."""
KEYS = ("CPU", "GPU")


@dataclass(frozen=True)
class Cluster:
    now: dict[str, float]
    """The resources of the nodes up now."""
    nodes: list[tuple[dict[str, float], int]]
    """Each kind of node the cluster can have, with how many of it at most."""
    source: str
    """Where ``nodes`` comes from (said in messages)."""

    @property
    def most(self) -> dict[str, float]:
        """The most of each resource the cluster can hold at once."""
        return {key: sum(res.get(key, 0.0) * count for res, count in self.nodes) for key in KEYS}

    def workers_that_fit(self, need: dict[str, float]) -> int:
        """How many workers, each needing ``need``, the cluster can hold at once (at its largest)."""
        fit = 0
        for res, count in self.nodes:
            per_node = min((math.floor(res.get(k, 0.0) / v) for k, v in need.items() if v > 0), default=0)
            fit += per_node * count
        return fit


def _node_types(path: Path) -> list[tuple[dict[str, float], int]]:
    import yaml

    try:
        spec = yaml.safe_load(path.read_text()) or {}
        types = spec["available_node_types"]
        head = spec.get("head_node_type")
        cap = int(spec.get("max_workers", 10**6))
        return [({k: float(v) for k, v in (t.get("resources") or {}).items()},
                 1 if name == head else min(int(t.get("max_workers", 0)), cap)) for name, t in types.items()]
    except (OSError, KeyError, TypeError, ValueError, AttributeError, yaml.YAMLError) as err:
        raise ConfigError(f"train.cluster_file: {path} is not a Ray cluster config with available_node_types "
                          f"({type(err).__name__}: {err})") from None


def inspect(cfg: Config) -> Cluster:
    """The Ray cluster this process is connected to (``ray.init`` done)."""
    import ray

    now = {k: float(v) for k, v in ray.cluster_resources().items() if k in KEYS}
    path = Path(cfg.train.cluster_file) if cfg.train.cluster_file else BOOTSTRAPPED if BOOTSTRAPPED.is_file() else None
    if path is None:
        nodes = [({k: float(v) for k, v in n["Resources"].items() if k in KEYS}, 1) for n in ray.nodes() if n["Alive"]]
        return Cluster(now, nodes, "the nodes up now; no autoscaler config (train.cluster_file)")
    return Cluster(now, _node_types(path), f"the node types of {path}")


def use_gpu(cfg: Config, cluster: Cluster) -> bool:
    """Workers ask for a GPU each: ``train.device=cuda``, or ``auto`` on a cluster that has (or can start) GPUs."""
    return cfg.train.device == "cuda" or (cfg.train.device == "auto" and cluster.most.get("GPU", 0) > 0)


def worker_need(cfg: Config, gpu: bool) -> dict[str, float]:
    return {"CPU": float(cfg.train.cpus_per_worker), **({"GPU": 1.0} if gpu else {})}


def _text(res: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in res.items() if v) or "nothing"


def check_fits(cfg: Config, cluster: Cluster, runs: int = 1) -> bool:
    """Whether ``runs`` trainings of ``cfg`` fit at once; an error naming the key to change when one never can."""
    gpu = use_gpu(cfg, cluster)
    need = worker_need(cfg, gpu)
    if cfg.train.device == "cuda" and not cluster.most.get("GPU"):
        raise ConfigError(f"train.device: cuda was asked for, but the Ray cluster has no GPU ({cluster.source}); "
                          "set train.device=auto or cpu")
    fit = cluster.workers_that_fit(need)
    if not fit:
        key = "train.cpus_per_worker" if any(r.get("CPU", 0) for r, _ in cluster.nodes) else "train.workers"
        raise ConfigError(f"{key}: a worker needs {_text(need)}, more than any node of the cluster has "
                          f"({cluster.source}); lower {key}" + (" or set train.device=cpu" if gpu else ""))
    if fit < cfg.train.workers:
        raise ConfigError(f"train.workers: {cfg.train.workers} workers of {_text(need)} each, but the cluster holds "
                          f"{fit} at most ({cluster.source}); lower train.workers")
    return fit >= cfg.train.workers * runs


def announce(cfg: Config, cluster: Cluster, runs: int = 1) -> None:
    """One line when what is up now cannot hold the work yet: the autoscaler is being asked for nodes."""
    need = worker_need(cfg, use_gpu(cfg, cluster))
    up = Cluster(cluster.now, [(cluster.now, 1)], "")
    if up.workers_that_fit(need) < cfg.train.workers * runs:
        print(f"gdml: waiting for the autoscaler to start nodes: {runs * cfg.train.workers} worker(s) of "
              f"{_text(need)} each; up now: {_text(cluster.now)} (the most: {_text(cluster.most)}, "
              f"{cluster.source})", flush=True)

