"""What a sweep and an ablation share: the context every trial is handed (``tune.with_parameters``, beside its
searched values), what a trial's own process takes, how many trials run at once, and the tuner that runs them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pipeline.config import Config


@dataclass(frozen=True)
class TrialContext:
    """What every trial of one sweep (or ablation) is handed."""

    base: Config
    """The config every trial starts from (resolved: absolute paths, the tracking URI)."""
    uri: str | None
    """The MLflow tracking URI (None: untracked)."""
    parent: str
    """The MLflow run id of the sweep's parent run."""
    name: str
    """The sweep's (or ablation's) name: its trials' runs are named after it."""
    metric: str = "val/recall_at_1"
    in_sequence: bool = False
    """A trial's k fold trainings one after another (``trial_plan``)."""


TRIAL_RESOURCES = {"CPU": 0, "memory": 256 * 2**20}
"""What a trial's own process takes: it only drives; its TorchTrainer's workers take the CPUs (or GPUs), so
the number of trials at once is capped by what their workers need (``trial_plan``), else every trial would
start and wait."""


def trial_plan(cfg: Config, requested: int | None = None) -> tuple[bool, int]:
    """(whether a trial's k > 1 fold trainings run one after another, how many trials run at once). Each training
    needs train.workers workers (of cpus_per_worker CPUs, and a GPU where workers ask for one); what the cluster
    holds is read from the node types its autoscaler can start, not only the nodes up now (``pipeline.cluster``);
    a trial's folds run side by side when the cluster holds all k at once, else in sequence; ``requested``
    (search.max_concurrent) overrides the count. Says so when the autoscaler has nodes to start first."""
    from pipeline import cluster as cluster_mod

    cluster = cluster_mod.inspect(cfg)
    cluster_mod.check_fits(cfg, cluster)
    have = cluster.workers_that_fit(cluster_mod.worker_need(cfg, cluster_mod.use_gpu(cfg, cluster)))
    per_run = cfg.train.workers
    side_by_side = have >= per_run * cfg.tune.folds
    in_sequence = cfg.tune.folds > 1 and not side_by_side
    at_once = requested or max(1, have // (per_run * (cfg.tune.folds if side_by_side else 1)))
    cluster_mod.announce(cfg, cluster, runs=at_once * (cfg.tune.folds if side_by_side else 1))
    return in_sequence, at_once


def tuner(trial: Callable[..., None], ctx: TrialContext, space: dict[str, Any], progress: bool,
          tune_config: Any) -> Any:
    """A Ray Tune ``Tuner`` over ``trial(params, ctx)``: its results in ``train.storage_path/<ctx.name>``."""
    from ray import tune

    return tune.Tuner(tune.with_resources(tune.with_parameters(trial, ctx=ctx), TRIAL_RESOURCES),
                      param_space=space, tune_config=tune_config,
                      run_config=tune.RunConfig(name=ctx.name, storage_path=ctx.base.train.storage_path,
                                                verbose=1 if progress else 0))
