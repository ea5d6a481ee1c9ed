"""Hyper-parameter sweeps with Ray Tune: trials scored on held-out training classes, the best retrained on all
and tested once. Also what ``ray submit ray_cluster.yaml tuning/sweep.py -- --config FILE`` runs.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray.train.v2.api.callback import UserCallback

from pipeline import config as config_mod
from pipeline import tracking
from pipeline.config import Config, ConfigError
from tuning import trials

log = logging.getLogger(__name__)


class Param(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["choice", "grid", "uniform", "loguniform", "randint"]
    values: list[Any] | None = None
    low: float | None = None
    high: float | None = None


class Asha(BaseModel):
    """ASHA's rungs: a trial is first judged after ``grace_period`` epochs, then at grace x factor, grace x
    factor^2, ... epochs; at each rung only the best 1/factor of the trials seen there go on. The defaults keep
    a quarter at each rung (measured in benchmarks/bench_sweep.py on a 16-trial grid)."""

    model_config = ConfigDict(extra="forbid")
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(4.0, gt=1.0)


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


SPEC_KEYS = ("search.", "final=", "name=")
"""``--set`` overrides that address the sweep file itself (``search.num_samples=2``, ``final=false``); every other
one addresses the base config of every trial."""


def load_spec(path: str | Path, overrides: list[str] | None = None) -> tuple[SweepSpec, Config]:
    """The sweep and its base config, every dotted name in the space checked against the config. ``overrides``
    (``key=value``) set the sweep's own keys (``SPEC_KEYS``) or the base config's."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep file {p} does not exist")
    raw = yaml.safe_load(p.read_text()) or {}
    own = [o for o in overrides or [] if o.strip().startswith(SPEC_KEYS)]
    overrides = [o for o in overrides or [] if o not in own]
    config_mod.apply_overrides(raw, own)
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        raise ConfigError(f"{p}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    base = config_mod.load((p.parent / spec.base).resolve(), overrides, values=spec.set)
    if base.train.val_fraction <= 0 and base.tune.folds == 1:
        raise ConfigError("train.val_fraction: a sweep chooses on held-out training classes; set it above 0 "
                          "(e.g. 0.2) in the sweep's 'set', or tune.folds to k > 1 for k-fold validation")
    from pipeline.preflight import check_model, resolve_paths

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


def search_algorithm(search: Search, seed: int, max_concurrent: int = 0) -> Any:
    """The search, seeded by ``train.seed`` so that a sweep run again proposes the same trials: Tune's own
    generator for random and grid, OptunaSearch (TPE) for optuna; at most ``max_concurrent`` trials at once (0: no
    limit). (The limit is set here: Tune ignores ``max_concurrent_trials`` beside a generator it is given.)"""
    if search.algorithm != "optuna":
        from ray.tune.search import BasicVariantGenerator

        return BasicVariantGenerator(max_concurrent=max_concurrent, random_state=seed)
    try:
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch
    except ImportError as err:
        raise ConfigError(f"search.algorithm: optuna needs the optuna package ({err}); "
                          "pip install 'gdml[tune]'") from None
    optuna = OptunaSearch(seed=seed)
    return ConcurrencyLimiter(optuna, max_concurrent=max_concurrent) if max_concurrent else optuna


def trial_config(base: Config, params: dict[str, Any]) -> Config:
    """The base config with a trial's values set by dotted name."""
    return config_mod.with_values(base, params)


def _trial(params: dict[str, Any], ctx: trials.TrialContext) -> None:
    """One Tune trial: a TorchTrainer (k of them with ``tune.folds``) whose per-epoch reports Tune sees."""
    from ray import tune

    from pipeline.variants import variant_of

    cfg = trial_config(ctx.base, params)
    name = f"{ctx.name}-{tune.get_context().get_trial_id()}"
    with tracking.Tracker.open(ctx.uri, cfg.tracking.experiment, name,
                               tags={"mlflow.parentRunId": ctx.parent, "variant": variant_of(cfg),
                                     "gdml.sweep": ctx.name, "mode": "tune-trial"}) as tracker:
        tracker.log_params({**cfg.flat(), **{f"trial.{k}": v for k, v in params.items()}})
        if ctx.in_sequence:
            _folds_in_sequence(cfg, tracker, name, ctx)
        else:
            _paced_trainings(cfg, tracker, name, ctx)


def fold_summary(scores: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std, ddof=1, over sqrt(k)) of k fold scores."""
    k = len(scores)
    mean = sum(scores) / k
    var = sum((x - mean) ** 2 for x in scores) / (k - 1) if k > 1 else 0.0
    return mean, (var / k) ** 0.5


def _start(cfg: Config, tracker: tracking.Tracker, name: str, ctx: trials.TrialContext, fold: int | None,
           callbacks: list, epoch_gate: Any = None) -> list[dict]:
    """One training of a trial (``fold``: None for the trial itself, else that fold under its own MLflow run
    inside the trial's); returns its per-epoch reports."""
    from pipeline.launch import fit

    if fold is None:
        return fit(cfg, tracker, name, local=False, progress=False, callbacks=callbacks, epoch_gate=epoch_gate)[1]
    fold_cfg = config_mod.with_values(cfg, {"tune.fold": fold})
    fold_name = f"{name}-fold{fold}"
    with tracking.Tracker.open(tracker.uri, cfg.tracking.experiment, fold_name,
                               tags={"mlflow.parentRunId": tracker.run_id or "", "mode": "tune-fold",
                                     "gdml.sweep": ctx.name}) as fold_tracker:
        fold_tracker.log_params(fold_cfg.flat())
        return fit(fold_cfg, fold_tracker, fold_name, local=False, progress=False, callbacks=callbacks,
                   epoch_gate=epoch_gate)[1]


def _report_folds(tracker: tracking.Tracker, metric: str, step: int, scores: list[float],
                  extra: dict[str, Any]) -> None:
    """A k-fold trial's report: the mean over folds (``metric``), its standard error (``metric_se``) and each
    fold's score (``fold<i>/metric``), to Tune and to the trial's MLflow run."""
    from ray import tune

    mean, se = fold_summary(scores)
    out = {metric: mean, f"{metric}_se": se, **{f"fold{f}/{metric}": v for f, v in enumerate(scores)}}
    tracker.log_metrics(out, step=step)
    tune.report({**out, **extra})


def _folds_in_sequence(cfg: Config, tracker: tracking.Tracker, name: str, ctx: trials.TrialContext) -> None:
    """The cluster holds one training of the trial at a time: its k folds one after another, a report after
    each with the mean over the folds done so far, so that ASHA can stop a weak trial after its first fold
    instead of training all k (a fold starts only once Tune has accepted the report before it)."""
    metric, scores = ctx.metric, []
    for fold in range(cfg.tune.folds):
        history = _start(cfg, tracker, name, ctx, fold, [])
        scores.append(float(history[-1][metric]))
        _report_folds(tracker, metric, fold + 1, scores, {"folds_done": fold + 1, "epoch": cfg.train.epochs})


def _paced_trainings(cfg: Config, tracker: tracking.Tracker, name: str, ctx: trials.TrialContext) -> None:
    """The trial's training (or its k fold trainings, side by side), paced by Tune: after epoch e of every
    training the trial reports (the training's own metrics; with folds the mean over folds, see
    ``_report_folds``), and epoch e + 1 starts only once Tune has accepted that report (``pipeline.pacing``),
    so that a trial ASHA stops at a rung trains no further. The last report waits until every training has
    finished (its runs closed, its checkpoint kept): ASHA ends a trial at its last epoch too."""
    import threading

    from ray import tune
    from ray.util.queue import Queue

    from pipeline.pacing import EpochGate

    folds, metric, last = cfg.tune.folds, ctx.metric, cfg.train.epochs
    queue = Queue(actor_options={"num_cpus": 0})
    gate = EpochGate.remote()
    errors: dict[int, BaseException] = {}

    def one(fold: int) -> None:
        try:
            _start(cfg, tracker, name, ctx, fold if folds > 1 else None, [EpochReport(queue, fold)], gate)
        except BaseException as err:  # noqa: BLE001 - handed to the trial's thread, which raises it
            errors[fold] = err
        finally:
            queue.put((fold, None))

    threads = [threading.Thread(target=one, args=(f,), name=f"training{f}", daemon=True) for f in range(folds)]
    for t in threads:
        t.start()
    reports: dict[int, dict[int, dict]] = {}
    done: set[int] = set()
    epoch = 1
    while epoch <= last:
        fold, metrics = queue.get()
        if metrics is None:
            done.add(fold)
            if fold in errors:
                raise errors[fold]
        else:
            reports.setdefault(int(metrics["epoch"]), {})[fold] = metrics
        while len(reports.get(epoch, {})) == folds and (epoch < last or len(done) == folds):
            if folds == 1:
                tune.report(reports[epoch][0])
            else:
                _report_folds(tracker, metric, epoch, [float(reports[epoch][f][metric]) for f in range(folds)],
                              {"epoch": epoch})
            epoch += 1  # tune.report returned: Tune lets the trial go on
            gate.open.remote(epoch)
        if len(done) == folds and epoch <= last:
            raise RuntimeError(f"trial {name}: its trainings ended before reporting epoch {epoch} of {last}")
    for t in threads:
        t.join()


class EpochReport(UserCallback):
    """A Ray Train callback (it runs in the training's controller) that hands rank 0's report to the trial."""

    def __init__(self, queue: Any, fold: int) -> None:
        self.queue, self.fold = queue, fold

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        self.queue.put((self.fold, dict(metrics[0])))


def run(spec: SweepSpec, base: Config, progress: bool = True) -> dict[str, Any]:
    """Run the sweep: plan it, run its trials, summarise them, then retrain the best configuration on all training
    classes and test it once. Returns the summary (best params, its validation score, the test metrics)."""
    from pipeline.console import RayConsole, init_ray
    from pipeline.launch import journal_dir
    from pipeline.preflight import prepare

    base, uri, _ = prepare(base, local=False)
    init_ray()
    sweep_name = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    with RayConsole.for_run(journal_dir(base, sweep_name) / "ray.log", progress):
        parent = tracking.Tracker.open(uri, base.tracking.experiment, sweep_name, tags={"mode": "sweep"})
        parent.log_params({"sweep.metric": spec.search.metric, "sweep.algorithm": spec.search.algorithm,
                           "sweep.num_samples": spec.search.num_samples,
                           **{f"space.{k}": v.model_dump_json(exclude_none=True)
                              for k, v in spec.search.space.items()}})
        ctx, tune_config, max_t = plan(spec, base, uri, parent.run_id, sweep_name)
        with parent:
            results = trials.tuner(_trial, ctx, tune_space(spec), progress, tune_config).fit()
            summary = summarise(spec, ctx, results, parent, max_t)
            if spec.final:
                summary.update(retrain_best(ctx, summary["best_params"], parent, progress))
    return summary


def plan(spec: SweepSpec, base: Config, uri: str | None, parent_run_id: str, sweep_name: str
         ) -> tuple[trials.TrialContext, Any, int]:
    """(the trials' context, Tune's config: search, ASHA, concurrency; ASHA's time axis max_t)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    s = spec.search
    in_sequence, at_once = trials.trial_plan(base, s.max_concurrent)
    # ASHA's time: epochs, or with folds in sequence, folds (it may stop a trial after its first fold)
    max_t = base.tune.folds if in_sequence else base.train.epochs
    scheduler = ASHAScheduler(max_t=max_t, grace_period=min(s.asha.grace_period, max_t),
                              reduction_factor=s.asha.reduction_factor) if s.asha else None
    if base.tune.folds > 1:
        print(f"gdml: {base.tune.folds} class-disjoint folds per trial, "
              + ("trained one after another (the cluster holds one at a time; ASHA on the running mean per fold)"
                 if in_sequence else "trained in parallel (ASHA on the mean over folds per epoch)"),
              flush=True)
    ctx = trials.TrialContext(base, uri, parent_run_id, sweep_name, s.metric, in_sequence)
    tune_config = tune.TuneConfig(metric=s.metric, mode=s.mode, num_samples=s.num_samples, scheduler=scheduler,
                                  search_alg=search_algorithm(s, base.train.seed, at_once))
    return ctx, tune_config, max_t


def summarise(spec: SweepSpec, ctx: trials.TrialContext, results: Any, parent: tracking.Tracker, max_t: int
              ) -> dict[str, Any]:
    """The trials' table, the best trial, what they cost; logged to the parent run, each trial's run closed."""
    s, base = spec.search, ctx.base
    best = results.get_best_result(metric=s.metric, mode=s.mode)
    reports = sum(len(r.metrics_dataframe) for r in results if r.metrics_dataframe is not None)
    # a report is a whole fold (folds in sequence), else an epoch of each of the trial's k >= 1 trainings
    trial_epochs = reports * (base.train.epochs if ctx.in_sequence else base.tune.folds)
    _close_children(ctx.uri, base.tracking.experiment, ctx.name, best.metrics.get("trial_id"),
                    trial_outcomes(results, max_t))
    table = trial_table(results, s.metric, base.tune.folds)
    summary: dict[str, Any] = {"sweep": ctx.name, "parent_run_id": parent.run_id, "best_params": dict(best.config),
                               f"best_{s.metric}": best.metrics[s.metric],
                               f"best_{s.metric}_se": best.metrics.get(f"{s.metric}_se"),
                               "folds": base.tune.folds, "trial_epochs": trial_epochs, "trials": len(results),
                               "table": table}
    parent.log_metrics({f"best/{s.metric}": best.metrics[s.metric], "trial_epochs": trial_epochs})
    parent.log_dict({"best_params": summary["best_params"], "trials": table}, "sweep_results.yaml")
    parent.log_text(format_table(table, s.metric), "trials.txt")
    if table:
        parent.log_figure(plot_trials(table, s.metric, list(spec.search.space)), "plots/sweep_params.png")
    return summary


def retrain_best(ctx: trials.TrialContext, best_params: dict[str, Any], parent: tracking.Tracker, progress: bool
                 ) -> dict[str, Any]:
    """The best configuration trained on all training classes, tested once on the unseen classes."""
    from pipeline.launch import train_and_evaluate

    final_cfg = trial_config(ctx.base, {**best_params, "train.val_fraction": 0.0, "tune.folds": 1, "tune.fold": 0})
    final = train_and_evaluate(final_cfg, local=False, name=f"{ctx.name}-final", progress=progress,
                               tags={"mlflow.parentRunId": parent.run_id, "gdml.sweep": ctx.name,
                                     "mode": "sweep-final"})
    parent.log_metrics({f"final_test/{k}": v for k, v in final.metrics.items()})
    return {"test": final.metrics, "final_run_id": final.run_id}


def trial_table(results: Any, metric: str, folds: int) -> list[dict[str, Any]]:
    """One row per trial: its searched values, the last reported score (the k-fold mean), its standard error,
    the epochs it ran (ASHA may stop it early) and, with folds, every fold's score."""
    rows = []
    for r in results:
        m = r.metrics or {}
        row = {"params": dict(r.config), metric: m.get(metric),
               "se": m.get(f"{metric}_se"), "epochs": m.get("epoch")}
        if "folds_done" in m:
            row["folds_done"] = m["folds_done"]
        if folds > 1:
            row["folds"] = [m.get(f"fold{f}/{metric}") for f in range(folds)]
        rows.append(row)
    return rows


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_table(trials: list[dict[str, Any]], metric: str) -> str:
    """The trials, best first: score (± standard error over folds), epochs run, searched values."""
    def key(t: dict[str, Any]) -> float:
        return -(t[metric] if t[metric] is not None else float("-inf"))

    lines = []
    for t in sorted(trials, key=key):
        score = "n/a" if t[metric] is None else f"{t[metric]:.4f}"
        if t.get("se") is not None and t.get("folds_done", 2) > 1:  # one fold has no spread to speak of
            score += f" ± {t['se']:.4f}"
        values = ", ".join(f"{k}={_short(v)}" for k, v in t["params"].items())
        ran = (f"{t['folds_done']} fold{'s' * (t['folds_done'] != 1)}" if "folds_done" in t
               else f"{t['epochs'] or 0} epochs")
        lines.append(f"  {score:<18} {ran:>9}  {values}")
    return "\n".join(lines)


def plot_trials(trials: list[dict[str, Any]], metric: str, params: list[str]) -> Any:
    """One panel per searched parameter: the trial's score against its value (error bars: standard error)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(params), figsize=(4 * len(params), 3.2), squeeze=False)
    scored = [t for t in trials if t[metric] is not None]
    for ax, name in zip(axes[0], params):
        values = [t["params"].get(name) for t in scored]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        labels = sorted({str(v) for v in values})
        x = values if numeric else [labels.index(str(v)) for v in values]
        ax.errorbar(x, [t[metric] for t in scored], yerr=[t.get("se") or 0.0 for t in scored], fmt="o", capsize=3)
        if not numeric:
            ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=7)
        elif values and min(values) > 0 and max(values) / min(values) > 20:
            ax.set_xscale("log")
        ax.set_xlabel(name, fontsize=8)
        ax.set_ylabel(metric, fontsize=8)
    fig.suptitle("sweep: score of each trial against each searched value")
    fig.tight_layout()
    return fig


def trial_outcomes(results: Any, max_t: int) -> dict[str, str]:
    """trial id -> how its MLflow runs end: FAILED (an error), KILLED (stopped by the scheduler before its last
    report), FINISHED. Tune ends a trial's function when it stops it, at its last report too, often before the
    function's own ending runs: the runs are closed from here."""
    out = {}
    for r in results:
        m = r.metrics or {}
        if not m.get("trial_id"):
            continue
        if r.error is not None:
            out[m["trial_id"]] = "FAILED"
        else:
            out[m["trial_id"]] = "KILLED" if m.get("training_iteration", max_t) < max_t else "FINISHED"
    return out


def _close_children(uri: str | None, experiment: str, sweep: str, best_trial: str | None,
                    outcomes: dict[str, str]) -> None:
    """Tag the best trial's run; end each trial's run as its trial ended (``trial_outcomes``): a trial stopped by
    ASHA KILLED and tagged ``stopped_by=asha``, with its fold runs that were still running."""
    if uri is None:
        return
    for run in tracking.find_runs(uri, experiment, f"tags.`gdml.sweep` = '{sweep}'"):
        mode = run.data.tags.get("mode")
        if mode not in ("tune-trial", "tune-fold"):
            continue
        name = run.data.tags.get("gdml.run_name", "")
        trial = next((t for t in outcomes if name.endswith(f"-{t}") or f"-{t}-fold" in name), None)
        child = tracking.Tracker(uri, run.info.run_id)
        if best_trial and trial == best_trial and mode == "tune-trial":
            child.set_tags({"best": "true"})
        status = outcomes.get(trial)
        if mode == "tune-fold" and run.info.status != "RUNNING":
            continue  # a fold that ended on its own keeps its status
        if status == "KILLED":
            child.set_tags({"stopped_by": "asha"})
        if run.info.status != (status or "KILLED") and (status or run.info.status == "RUNNING"):
            child.end(status or "KILLED")  # (no outcome: Tune recorded nothing of the trial; its run was cut off)


def format_summary(summary: dict[str, Any], metric: str) -> str:
    folds = summary.get("folds", 1)
    score = f"{summary[f'best_{metric}']:.4f}"
    if folds > 1:
        score += f" ± {summary[f'best_{metric}_se']:.4f} (mean ± standard error over {folds} class-disjoint folds)"
    lines = [f"sweep {summary['sweep']}: {summary['trials']} trials, {summary['trial_epochs']} trial-epochs"
             + (f" ({folds} folds each)" if folds > 1 else ""),
             f"trials, best first ({metric}):", format_table(summary.get("table", []), metric),
             f"best on validation classes ({metric} = {score}): {summary['best_params']}"]
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
