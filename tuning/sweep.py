"""Hyper-parameter sweeps with Ray Tune: validated on held-out training classes, tested once.

Each trial is a driver function that builds a Ray Train ``TorchTrainer`` (the current Ray Train pattern) and
forwards its per-epoch reports to Tune. Trials are scored on ``val/<metric>``: classes held out from the
*training* classes (``train.val_fraction``). The best configuration is then retrained on all training
classes and evaluated once on the unseen test classes: that is the number reported. MLflow holds one parent
run per sweep, a child run per trial (``mlflow.parentRunId``), the best trial tagged, and the final run.

This file is also what ``ray submit`` ships to a cluster's head node:

    python tuning/sweep.py --config configs/sweep_demo.yaml [--set key=value ...]
    ray submit ray_cluster.yaml tuning/sweep.py -- --config configs/sweep_demo.yaml
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline import config as config_mod
from pipeline import tracking
from pipeline.config import Config, ConfigError

log = logging.getLogger(__name__)


class Param(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["choice", "grid", "uniform", "loguniform", "randint"]
    values: list[Any] | None = None
    low: float | None = None
    high: float | None = None


class Asha(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1.0)


class Search(BaseModel):
    model_config = ConfigDict(extra="forbid")
    algorithm: Literal["random", "grid", "optuna"] = "random"
    num_samples: int = Field(4, ge=1)
    """Trials (random/optuna); with grid, how often the whole grid repeats."""
    metric: str = "val/recall_at_1"
    mode: Literal["max", "min"] = "max"
    asha: Asha | None = Asha()
    """ASHA early stopping on the metric; null: every trial runs all its epochs."""
    max_concurrent: int | None = Field(None, ge=1)
    """None: as many trials as the cluster's CPUs (or GPUs) hold at once."""
    space: dict[str, Param]


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "sweep"
    base: str
    """The experiment config every trial starts from (relative to this file)."""
    set: dict[str, Any] = {}
    """Overrides of the base config for every trial (dotted names)."""
    search: Search
    final: bool = True
    """Retrain the best configuration on all training classes and test it once."""


def load_spec(path: str | Path, overrides: list[str] | None = None) -> tuple[SweepSpec, Config]:
    """The sweep and its base config, every dotted name in the space checked against the config."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep file {p} does not exist")
    raw = yaml.safe_load(p.read_text()) or {}
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        raise ConfigError(f"{p}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    base = config_mod.load((p.parent / spec.base).resolve(), overrides, values=spec.set)
    if base.train.val_fraction <= 0:
        raise ConfigError("train.val_fraction: a sweep chooses on held-out training classes; set it above 0 "
                          "(e.g. 0.2) in the sweep's 'set'")
    from pipeline.launch import check_model, resolve_paths

    flat = base.flat()
    for key, param in spec.search.space.items():
        if key not in flat and not key.startswith("loss.params."):
            raise ConfigError(f"search.space: {key!r} is not a config field")
        for value in _examples(param):
            check_model(resolve_paths(trial_config(base, {key: value})))  # every value must make a valid run
    return spec, base


def _examples(param: Param) -> list[Any]:
    if param.type in ("choice", "grid"):
        if not param.values:
            raise ConfigError(f"search.space: a {param.type} needs 'values'")
        return list(param.values)
    if param.low is None or param.high is None or param.low >= param.high:
        raise ConfigError(f"search.space: a {param.type} needs low < high")
    return [param.low, param.high] if param.type != "randint" else [int(param.low)]


def tune_space(spec: SweepSpec) -> dict[str, Any]:
    from ray import tune

    make = {
        "choice": lambda p: tune.choice(p.values),
        "grid": lambda p: tune.grid_search(p.values),
        "uniform": lambda p: tune.uniform(p.low, p.high),
        "loguniform": lambda p: tune.loguniform(p.low, p.high),
        "randint": lambda p: tune.randint(int(p.low), int(p.high)),
    }
    return {key: make[p.type](p) for key, p in spec.search.space.items()}


def trial_config(base: Config, params: dict[str, Any]) -> Config:
    """The base config with a trial's values set by dotted name."""
    return config_mod.with_values(base, params)


def _trial(params: dict[str, Any]) -> None:
    """One Tune trial: a TorchTrainer whose per-epoch reports Tune sees (runs in a Tune actor)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.launch import fit
    from pipeline.variants import variant_of

    ctx = params.pop("__gdml")
    cfg = trial_config(Config.model_validate(ctx["base"]), params)
    name = f"{ctx['sweep']}-{tune.get_context().get_trial_id()}"
    with tracking.Tracker.open(ctx["uri"], cfg.tracking.experiment, name,
                               tags={"mlflow.parentRunId": ctx["parent"], "variant": variant_of(cfg),
                                     "gdml.sweep": ctx["sweep"], "mode": "tune-trial"}) as tracker:
        tracker.log_params({**cfg.flat(), **{f"trial.{k}": v for k, v in params.items()}})
        fit(cfg, tracker, name, local=False, progress=False, callbacks=[TuneReportCallback()])


def concurrency(cfg: Config, requested: int | None) -> int:
    """Trials that fit at once: each needs train.workers x cpus_per_worker CPUs (or workers GPUs)."""
    import ray

    if requested:
        return requested
    res = ray.cluster_resources()
    if cfg.train.device == "cuda" or (cfg.train.device == "auto" and res.get("GPU", 0) > 0):
        per_trial, have = cfg.train.workers, res.get("GPU", 0)
    else:
        per_trial, have = cfg.train.workers * cfg.train.cpus_per_worker, res.get("CPU", 1)
    if have < per_trial:
        raise ConfigError(f"train.workers: a trial needs {per_trial} of a resource the cluster has {have:g} of; "
                          "lower train.workers or train.cpus_per_worker")
    return max(1, int(have // per_trial))


def run(spec: SweepSpec, base: Config, progress: bool = True) -> dict[str, Any]:
    """Run the sweep; returns the best trial's params, its validation score, and the final test metrics."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from pipeline.launch import init_ray, prepare, train_and_evaluate

    base, uri, _ = prepare(base, local=False)
    init_ray()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    sweep_name = f"{spec.name}-{stamp}"
    parent = tracking.Tracker.open(uri, base.tracking.experiment, sweep_name, tags={"mode": "sweep"})
    parent.log_params({"sweep.metric": spec.search.metric, "sweep.algorithm": spec.search.algorithm,
                       "sweep.num_samples": spec.search.num_samples,
                       **{f"space.{k}": v.model_dump_json(exclude_none=True) for k, v in spec.search.space.items()}})
    s = spec.search
    search_alg = None
    if s.algorithm == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as err:
            raise ConfigError(f"search.algorithm: optuna needs the optuna package ({err}); pip install optuna") from None
        search_alg = OptunaSearch()
    scheduler = ASHAScheduler(max_t=base.train.epochs, grace_period=s.asha.grace_period,
                              reduction_factor=s.asha.reduction_factor) if s.asha else None
    space = {**tune_space(spec), "__gdml": {"base": base.to_dict(), "uri": uri, "parent": parent.run_id,
                                             "sweep": sweep_name}}
    tuner = tune.Tuner(
        tune.with_resources(_trial, {"CPU": 0, "memory": 256 * 2**20}),
        param_space=space,
        tune_config=tune.TuneConfig(metric=s.metric, mode=s.mode, num_samples=s.num_samples, scheduler=scheduler,
                                    search_alg=search_alg, max_concurrent_trials=concurrency(base, s.max_concurrent)),
        run_config=tune.RunConfig(name=sweep_name, storage_path=base.train.storage_path, verbose=1 if progress else 0),
    )
    with parent:
        results = tuner.fit()
        best = results.get_best_result(metric=s.metric, mode=s.mode)
        best_params = {k: v for k, v in best.config.items() if k != "__gdml"}
        trial_epochs = sum(len(r.metrics_dataframe) for r in results if r.metrics_dataframe is not None)
        _close_children(uri, base.tracking.experiment, sweep_name, best.metrics.get("trial_id"))
        summary: dict[str, Any] = {"sweep": sweep_name, "parent_run_id": parent.run_id, "best_params": best_params,
                                   f"best_{s.metric}": best.metrics[s.metric], "trial_epochs": trial_epochs,
                                   "trials": len(results)}
        parent.log_metrics({f"best/{s.metric}": best.metrics[s.metric], "trial_epochs": trial_epochs})
        parent.log_dict({"best_params": best_params, "trials": [
            {"params": {k: v for k, v in r.config.items() if k != "__gdml"},
             s.metric: (r.metrics or {}).get(s.metric), "epochs": (r.metrics or {}).get("epoch")} for r in results
        ]}, "sweep_results.yaml")
        if spec.final:
            final_cfg = trial_config(base, best_params)
            final_cfg = final_cfg.model_copy(update={"train": final_cfg.train.model_copy(update={"val_fraction": 0.0})})
            final = train_and_evaluate(final_cfg, local=False, name=f"{sweep_name}-final", progress=progress,
                                       tags={"mlflow.parentRunId": parent.run_id, "gdml.sweep": sweep_name,
                                             "mode": "sweep-final"})
            summary["test"] = final.metrics
            summary["final_run_id"] = final.run_id
            parent.log_metrics({f"final_test/{k}": v for k, v in final.metrics.items()})
    return summary


def _close_children(uri: str | None, experiment: str, sweep: str, best_trial: str | None) -> None:
    """Tag the best trial's run; close runs that ASHA stopped (their trial was ended mid-training)."""
    if uri is None:
        return
    for run in tracking.find_runs(uri, experiment, f"tags.`gdml.sweep` = '{sweep}'"):
        if run.data.tags.get("mode") != "tune-trial":
            continue
        child = tracking.Tracker(uri, run.info.run_id)
        if best_trial and run.data.tags.get("gdml.run_name", "").endswith(best_trial):
            child.set_tags({"best": "true"})
        if run.info.status == "RUNNING":
            child.set_tags({"stopped_by": "asha"})
            child.end("KILLED")


def format_summary(summary: dict[str, Any], metric: str) -> str:
    lines = [f"sweep {summary['sweep']}: {summary['trials']} trials, {summary['trial_epochs']} trial-epochs",
             f"best on validation classes ({metric} = {summary[f'best_{metric}']:.4f}): {summary['best_params']}"]
    if "test" in summary:
        lines.append("retrained on all training classes, tested once on the unseen classes:")
        lines += [f"  {k:<16}{v:.4f}" for k, v in summary["test"].items()]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a sweep, shared by ``gdml tune`` and ``python tuning/sweep.py``."""
    parser.add_argument("--config", required=True, type=Path, help="sweep YAML, e.g. configs/sweep_demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a base config value for every trial")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sweep.py", description="gdml hyper-parameter sweep with Ray Tune")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    try:
        spec, base = load_spec(args.config, args.overrides)
        summary = run(spec, base)
    except ConfigError as err:
        print(f"gdml: config error: {err}", file=sys.stderr)
        return 2
    print(format_summary(summary, spec.search.metric))
    return 0


if __name__ == "__main__":
    sys.exit(main())
