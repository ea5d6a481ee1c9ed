"""The claim, measured: {baseline, +attention, +adversary, +both} x losses x seeds on unseen classes, a Ray Tune
grid with one MLflow parent run (table and plot). ``gdml ablate --config configs/demo.yaml``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import config as config_mod
from pipeline import tracking
from pipeline.config import Config
from pipeline.variants import VARIANTS, slug, with_variant
from tuning import trials

REPORTED = ("recall_at_1", "map_at_r", "nmi")


def variant_config(cfg: Config, variant: str, loss: str, seed: int) -> Config:
    cfg = with_variant(cfg, variant)
    return config_mod.with_values(cfg, {"loss.name": loss, "loss.params": cfg.loss.params if loss == cfg.loss.name
                                        else {}, "train.seed": seed})


def _run_one(params: dict[str, Any], ctx: trials.TrialContext) -> None:
    """A Tune trial: one training (a TorchTrainer with ``train.workers`` workers) + its test evaluation.

    Results go to the trial's MLflow child run, where ``run`` collects them.
    """
    from pipeline.launch import train_and_evaluate

    cfg = variant_config(ctx.base, params["variant"], params["loss"], params["seed"])
    name = f"{ctx.name}-{slug(params['variant'])}-{params['loss']}-s{params['seed']}"
    train_and_evaluate(cfg, local=False, name=name, progress=False, plots=False,
                       tags={"mlflow.parentRunId": ctx.parent, "gdml.ablation": ctx.name, "mode": "ablation",
                             "ablation.variant": params["variant"], "ablation.loss": params["loss"],
                             "ablation.seed": str(params["seed"])})


def collect(uri: str, experiment: str, name: str) -> list[dict[str, Any]]:
    """Each finished run of an ablation, from MLflow: variant, loss, seed and its test metrics."""
    runs = tracking.find_runs(uri, experiment, f"tags.`gdml.ablation` = '{name}'")
    return [{"variant": r.data.tags["ablation.variant"], "loss": r.data.tags["ablation.loss"],
             "seed": int(r.data.tags["ablation.seed"]),
             **{k: r.data.metrics[f"test/{k}"] for k in REPORTED}, "train_seconds": r.data.metrics["train_seconds"]}
            for r in runs if r.info.status == "FINISHED"]


def mean_std(values: list[float]) -> str:
    """'mean ± sample standard deviation' (ddof=1) over seeds; the mean alone for a single seed."""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def summarise(rows: list[dict[str, Any]], losses: list[str], variants: list[str] | None = None) -> str:
    """Markdown: one row per variant, mean ± sample std over seeds of each reported metric, per loss."""
    head = "| variant | " + " | ".join(f"{loss} {m}" for loss in losses for m in REPORTED) + " |"
    lines = [head, "|" + "---|" * (1 + len(losses) * len(REPORTED))]
    for variant in variants or VARIANTS:
        cells = []
        for loss in losses:
            for metric in REPORTED:
                values = [r[metric] for r in rows if r["variant"] == variant and r["loss"] == loss]
                cells.append(mean_std(values) if values else "n/a")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], losses: list[str], variants: list[str] | None = None):
    from pipeline.evaluation.plots import plt

    variants = variants or list(VARIANTS)
    fig, axes = plt.subplots(1, len(losses), figsize=(4 * len(losses), 3.4), dpi=110, squeeze=False)
    for ax, loss in zip(axes[0], losses):
        means, stds = [], []
        for variant in variants:
            values = [r["recall_at_1"] for r in rows if r["variant"] == variant and r["loss"] == loss]
            means.append(np.mean(values) if values else 0.0)
            stds.append(np.std(values, ddof=1) if len(values) > 1 else 0.0)
        colours = {"baseline": "#999", "+attention": "#4c78a8", "+adversary": "#f58518", "+both": "#54a24b"}
        ax.bar(variants, means, yerr=stds, capsize=4, color=[colours[v] for v in variants])
        ax.set_title(loss)
        ax.set_ylabel("Recall@1 (unseen classes)")
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    return fig


def run(cfg: Config, losses: list[str], seeds: list[int], progress: bool = True,
        variants: list[str] | None = None) -> dict[str, Any]:
    from ray import tune

    from pipeline.console import init_ray
    from pipeline.preflight import check_config, prepare, resolve_paths

    variants = list(variants or VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"--variants: unknown {', '.join(unknown)}; expected some of {', '.join(VARIANTS)}")
    cfg = resolve_paths(cfg)
    for loss in losses:
        for variant in variants:
            check_config(variant_config(cfg, variant, loss, seeds[0]), local=False)
    cfg, uri, manifest = prepare(cfg, local=False)
    if uri is None:
        raise RuntimeError("an ablation collects its results from MLflow: it needs tracking.required=true")
    init_ray()
    name = f"ablation-{time.strftime('%Y%m%d-%H%M%S')}"
    parent = tracking.Tracker.open(uri, cfg.tracking.experiment, name, tags={"mode": "ablation-parent"})
    parent.log_params({**cfg.flat(), "ablation.losses": losses, "ablation.seeds": seeds,
                       "ablation.variants": variants})
    started = time.perf_counter()
    space = {"variant": tune.grid_search(variants), "loss": tune.grid_search(losses),
             "seed": tune.grid_search(seeds)}
    tuner = trials.tuner(_run_one, trials.TrialContext(cfg, uri, parent.run_id, name), space, progress,
                         tune.TuneConfig(max_concurrent_trials=trials.trial_plan(cfg)[1]))
    with parent:
        results = tuner.fit()
        errors = [r.error for r in results if r.error]
        if errors:
            raise RuntimeError(f"{len(errors)} ablation runs failed; first: {errors[0]}")
        rows = collect(uri, cfg.tracking.experiment, name)
        table = summarise(rows, losses, variants)
        seconds = time.perf_counter() - started
        parent.log_dict({"runs": rows}, "ablation_runs.yaml")
        parent.log_metrics({"ablation_seconds": seconds})
        parent.log_text(table, "ablation.md")
        parent.log_figure(plot(rows, losses, variants), "ablation_recall_at_1.png")
    return {"name": name, "table": table, "rows": rows, "seconds": seconds, "parent_run_id": parent.run_id,
            "manifest_test_classes": len(manifest.class_ids("test"))}


def write_table(result: dict[str, Any], path: Path) -> None:
    path.write_text(result["table"] + "\n")
