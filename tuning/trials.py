"""What a sweep and an ablation share: the context every trial is handed (``tune.with_parameters``, beside its
searched values), what a trial's own process takes, how many trials run at once, and the tuner that runs them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pipeline.config import Config, ConfigError


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


def _capacity(cfg: Config) -> tuple[int, float]:
    """(what one training needs, what the cluster has) of the resource trials are limited by."""
    import ray

    res = ray.cluster_resources()
    if cfg.train.device == "cuda" or (cfg.train.device == "auto" and res.get("GPU", 0) > 0):
        per_run, have = cfg.train.workers, res.get("GPU", 0)
    else:
        per_run, have = cfg.train.workers * cfg.train.cpus_per_worker, res.get("CPU", 1)
    if have < per_run:
        raise ConfigError(f"train.workers: a trial needs {per_run} of a resource the cluster has {have:g} of; "
                          "lower train.workers or train.cpus_per_worker")
    return per_run, have


def trial_plan(cfg: Config, requested: int | None = None) -> tuple[bool, int]:
    """(whether a trial's k > 1 fold trainings run one after another, how many trials run at once). Each training
    needs train.workers x cpus_per_worker CPUs (or workers GPUs); a trial's folds run side by side when the
    cluster holds all k at once, else in sequence; ``requested`` (search.max_concurrent) overrides the count."""
    per_run, have = _capacity(cfg)
    side_by_side = have >= per_run * cfg.tune.folds
    in_sequence = cfg.tune.folds > 1 and not side_by_side
    return in_sequence, requested or max(1, int(have // (per_run * (cfg.tune.folds if side_by_side else 1))))


def tuner(trial: Callable[..., None], ctx: TrialContext, space: dict[str, Any], progress: bool,
          tune_config: Any) -> Any:
    """A Ray Tune ``Tuner`` over ``trial(params, ctx)``: its results in ``train.storage_path/<ctx.name>``."""
    from ray import tune

    return tune.Tuner(tune.with_resources(tune.with_parameters(trial, ctx=ctx), TRIAL_RESOURCES),
                      param_space=space, tune_config=tune_config,
                      run_config=tune.RunConfig(name=ctx.name, storage_path=ctx.base.train.storage_path,
                                                verbose=1 if progress else 0))
