"""``gdml``: the command line. The one place that knows pipeline, tuning and deploy."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from pipeline import config as config_mod
from pipeline.config import Config, ConfigError
from pipeline.errors import GdmlError

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
DESCRIPTION = """gdml trains image embeddings that generalise to classes never seen in training: attention over the
backbone's intermediate layers and a class-adversarial head, around any pytorch-metric-learning loss; trained
with Ray Train (or in one process with --local), tracked in MLflow, evaluated on unseen classes (Recall@K, MAP@R,
NMI).

start with:  gdml demo            (baseline vs the framework on the embedded emoji set)
then:        gdml train --config configs/cub.yaml --set model.adversary.weight=0.3
             gdml tune --config configs/sweep_demo.yaml
             gdml package --run <MLflow run id>;  gdml query image.png
the documentation: docs/ (mkdocs serve), every config key in docs/reference/configuration.md;
gdml <command> --help for a command's flags"""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gdml")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _add_config_args(p: argparse.ArgumentParser, default: Path | None = None) -> None:
    p.add_argument("--config", type=Path, default=default,
                   help="experiment YAML" + (f" (default {default})" if default else ""))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by its dotted name, e.g. --set model.adversary.weight=0.3")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gdml", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"gdml {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one model, then evaluate it on the unseen test classes")
    _add_config_args(p)
    p.add_argument("--local", action="store_true", help="one process, no Ray workers")

    p = sub.add_parser("demo", help="baseline vs framework on the embedded emoji set, side by side")
    _add_config_args(p, DEMO_CONFIG)
    p.add_argument("--local", action="store_true", help="one process, no Ray workers")

    p = sub.add_parser("eval", help="evaluate a trained model (MLflow run or checkpoint) and log metrics + plots")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="MLflow run id whose checkpoint to evaluate (results go to that run)")
    src.add_argument("--checkpoint", type=Path, help="checkpoint directory (results go to a new MLflow run)")
    p.add_argument("--split", default="test", help="split to evaluate: test (unseen classes, default) or train")
    p.add_argument("--data-root", help="shards location, if not where the model was trained from")
    p.add_argument("--no-plots", action="store_true", help="metrics only")

    from pipeline.data.sources import SOURCES
    from pipeline.variants import VARIANTS

    p = sub.add_parser("tune", help="hyper-parameter sweep with Ray Tune (same as python tuning/sweep.py)")
    from tuning.sweep import add_arguments

    add_arguments(p)

    p = sub.add_parser("ablate", help="baseline / +attention / +adversary / +both x losses x seeds on unseen classes")
    _add_config_args(p, DEMO_CONFIG)
    p.add_argument("--losses", nargs="+", default=["contrastive", "triplet", "multi_similarity"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                   help="which variants to run (default all)")
    p.add_argument("--out", type=Path, default=Path("ablation.md"), help="markdown table (default ablation.md)")

    p = sub.add_parser("package", help="embed a gallery, index it, and register the model + index in MLflow")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="MLflow run id whose checkpoint to package")
    src.add_argument("--checkpoint", type=Path, help="checkpoint directory to package")
    p.add_argument("--name", default="gdml-retrieval", help="registered model name (default gdml-retrieval)")
    p.add_argument("--alias", default="champion", help="alias to point at the new version (default champion)")
    p.add_argument("--gallery", default="test", help="split of the model's shards to index (default test)")
    p.add_argument("--data-root", help="shards location, if not where the model was trained from")
    p.add_argument("--ivf-threshold", type=int, default=50_000, help="exact index below this many items, IVF above")
    p.add_argument("--nprobe", type=int, default=16, help="IVF lists searched per query")

    p = sub.add_parser("query", help="top-k gallery items for images, through a packaged model")
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--model", default="models:/gdml-retrieval@champion", help="model URI")
    p.add_argument("-k", type=int, default=5)

    p = sub.add_parser("replay", help="send a run's tracking journal (writes an unreachable MLflow server missed)")
    p.add_argument("journal", type=Path, help="the journal file (tracking-journal.jsonl beside the run's checkpoints)")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to keep trying (default 60)")

    p = sub.add_parser("backbones", help="list each backbone's tap names with channels and stride")
    p.add_argument("--image-size", type=int, default=224, help="input side used to read the strides (default 224)")
    p.add_argument("--timm", metavar="PATTERN", help="list timm models matching PATTERN (e.g. 'vit_small*') with "
                   "their taps, for model.backbone=timm/<name>")

    p = sub.add_parser("shards", help="build WebDataset shards from a source, or check them")
    shard_sub = p.add_subparsers(dest="shards_command", required=True)
    v = shard_sub.add_parser("verify", help="check every shard's sha256 against its manifest")
    v.add_argument("root", type=Path, help="the shards' folder (data.root)")
    b = shard_sub.add_parser("build", help="build (or reuse) the shards of data.source under data.root")
    _add_config_args(b)
    b.add_argument("--source", help=f"data.source: {', '.join(SOURCES)}")
    b.add_argument("--path", help="data.path: the raw dataset's folder")
    b.add_argument("--out", help="data.root: where the shards go")
    b.add_argument("--shard-size", type=int, help="data.shard_max_samples: target images per shard")
    b.add_argument("--max-side", type=int, help="data.max_side: re-encode images to at most this side")
    b.add_argument("--workers", type=int, help="data.build_workers: processes writing shards")
    b.add_argument("--force", action="store_true", help="rebuild even if matching shards exist")
    return parser


def _format_metrics_table(rows: dict[str, dict[str, float]], extra: dict[str, dict[str, str]] | None = None) -> str:
    from pipeline.evaluation.metrics import ordered

    names = list(rows)
    keys = ordered(k for r in rows.values() for k in r)
    width = max(12, *(len(n) for n in names))
    lines = ["metric".ljust(14) + "".join(n.rjust(width + 2) for n in names)]
    for k in keys:
        lines.append(k.ljust(14) + "".join(f"{rows[n].get(k, float('nan')):.4f}".rjust(width + 2) for n in names))
    for label, values in (extra or {}).items():
        lines.append(label.ljust(14) + "".join(str(values.get(n, "")).rjust(width + 2) for n in names))
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.launch import train_and_evaluate
    from pipeline.tracking import browse_hint

    cfg = config_mod.load(args.config, args.overrides)
    result = train_and_evaluate(cfg, local=args.local)
    print(_format_metrics_table({result.name: result.metrics}, {"skipped images": {result.name: result.skipped}}))
    if result.run_id:
        print(f"\nMLflow run {result.run_id} ({result.tracking_uri}); browse it: "
              f"{browse_hint(result.tracking_uri, cfg.tracking.experiment, result.run_id)}")
    print(f"checkpoint: {result.checkpoint}\nrun again with --set train.name={result.name} to resume it")
    return 0


def demo_variants(cfg: Config) -> dict[str, Config]:
    """The baseline (no attention, no adversary) and the full framework (+both), otherwise identical."""
    from pipeline.variants import with_variant

    return {name: with_variant(cfg, name) for name in ("baseline", "+both")}


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.launch import train_and_evaluate
    from pipeline.preflight import check_config, prepare, resolve_paths
    from pipeline.tracking import browse_hint
    from pipeline.variants import slug

    cfg = config_mod.load(args.config, args.overrides)
    variants = demo_variants(cfg)
    for v in variants.values():
        check_config(resolve_paths(v), args.local)
    started = time.perf_counter()
    _, _, manifest = prepare(variants["+both"], args.local)  # tracking, data checks, then the shards
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = {}
    for label, vcfg in variants.items():
        where = "local" if args.local else f"{vcfg.train.workers} Ray workers"
        print(f"\n== {label}: attention={vcfg.model.attention.enabled} adversary={vcfg.model.adversary.enabled} "
              f"loss={vcfg.loss.name} epochs={vcfg.train.epochs} ({where})", flush=True)
        results[label] = train_and_evaluate(vcfg, local=args.local, name=f"demo-{slug(label)}-{stamp}",
                                            tags={"demo": stamp})
    elapsed = time.perf_counter() - started
    first = next(iter(results.values()))
    d, classes = cfg.data, len(manifest.class_ids("test"))
    print(f"\nZero-shot retrieval on the {classes} unseen emoji classes ({manifest.images('test')} images) "
          f"(backbone {cfg.model.backbone}, embedding {cfg.model.embedding_size}, {d.image_size} px, "
          f"loss {cfg.loss.name}, {cfg.train.epochs} epochs, seed {cfg.train.seed}):")
    print(_format_metrics_table({k: r.metrics for k, r in results.items()},
                                {"train seconds": {k: f"{r.seconds:.0f}" for k, r in results.items()}}))
    gain = results["+both"].metrics["recall_at_1"] - results["baseline"].metrics["recall_at_1"]
    print(f"\n+both - baseline: {gain:+.4f} Recall@1 on one seed (seed {cfg.train.seed}); a difference means something "
          "only well beyond the spread over seeds, which `gdml ablate --seeds 0 1 2` measures (docs/claim.md)")
    print(f"demo took {elapsed:.0f} s. MLflow runs: " + ", ".join(f"{k}={r.run_id}" for k, r in results.items()))
    spent = _diagnostics_seconds(results.values())
    if spent is not None:
        print(f"diagnostics (gap curve every epoch, worst queries, attention maps, per-class table): {spent:.0f} s "
              f"of the {elapsed:.0f} s ({100 * spent / elapsed:.1f}%)")
    if first.tracking_uri:
        print(f"browse them: {browse_hint(first.tracking_uri, cfg.tracking.experiment)}  "
              f"(experiment '{cfg.tracking.experiment}', tag demo={stamp})")
    return 0


def _diagnostics_seconds(results) -> float | None:
    """What the runs' diagnostics cost, from what they logged (gap_seconds per epoch, test/diagnostics_seconds)."""
    from mlflow.tracking import MlflowClient

    total = 0.0
    for r in results:
        if not r.tracking_uri:
            return None
        client = MlflowClient(r.tracking_uri)
        for key in ("gap_seconds", "test/diagnostics_seconds"):
            total += sum(m.value for m in client.get_metric_history(r.run_id, key))
    return total


def cmd_shards(args: argparse.Namespace) -> int:
    from pipeline.data import shards
    from pipeline.preflight import resolve_paths

    if args.shards_command == "verify":
        manifest = shards.load_manifest(args.root)
        count = sum(len(manifest.shards(split)) for split in manifest.splits)
        altered = shards.verify(args.root)
        if altered:
            print(f"{len(altered)} of {count} shards differ from their manifest (altered after they were built): "
                  f"{', '.join(altered)}; rebuild them with gdml shards build --force", file=sys.stderr)
            return 1
        print(f"all {count} shards in {args.root} match their manifest (sha256)")
        return 0
    flags = {"source": "data.source", "path": "data.path", "out": "data.root", "shard_size": "data.shard_max_samples",
             "max_side": "data.max_side", "workers": "data.build_workers"}
    extra = [f"{key}={getattr(args, flag)}" for flag, key in flags.items() if getattr(args, flag) is not None]
    cfg = resolve_paths(config_mod.load(args.config, [*args.overrides, *extra]))
    if args.force:
        for record in Path(cfg.data.root).glob("*.tar.json"):
            record.unlink()
    manifest = shards.build(cfg.data) if args.force else shards.ensure(cfg.data)
    for split, info in manifest.data["splits"].items():
        print(f"{split}: {info['classes']} classes, {info['samples']} images, {len(info['shards'])} shards")
    if manifest.bad:
        print(f"left out {len(manifest.bad)} unreadable images (listed in the manifest under 'bad'), e.g.:")
        for line in manifest.bad[:5]:
            print(f"  {line}")
    print(f"manifest: {Path(cfg.data.root) / shards.MANIFEST}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import tempfile

    from pipeline import tracking
    from pipeline.checkpoint import checkpoint_config, load_checkpoint
    from pipeline.data import shards
    from pipeline.evaluation.run import evaluate_checkpoint, log_evaluation
    from pipeline.paths import absolute

    uri = tracking.resolve_uri(Config().tracking)
    with tempfile.TemporaryDirectory(prefix="gdml-eval-") as tmp:
        checkpoint = tracking.download_checkpoint(uri, args.run, tmp) if args.run else str(args.checkpoint)
        cfg = checkpoint_config(load_checkpoint(checkpoint), checkpoint)
        if args.data_root:
            cfg = config_mod.with_values(cfg, {"data.root": absolute(args.data_root)})
        manifest = shards.load_manifest(cfg.data.root)
        ev = evaluate_checkpoint(checkpoint, cfg, manifest, args.split)
        tracker = tracking.Tracker(uri, args.run) if args.run else tracking.Tracker.start(
            uri, cfg.tracking.experiment, f"eval-{Path(checkpoint).name}",
            tags={"evaluates": str(Path(checkpoint).resolve())})
        log_evaluation(tracker, ev, manifest, args.split, plots=not args.no_plots,
                       seed=cfg.train.seed, image_size=cfg.data.image_size)
        if not args.run:
            tracker.end()
    print(_format_metrics_table({args.split: ev.metrics}, {"skipped images": {args.split: ev.skipped}}))
    print(f"\nlogged to MLflow run {tracker.run_id} as {args.split}/<metric>"
          + ("" if args.no_plots else f" with plots/{args.split}_*.png"))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from tuning import sweep

    spec, base = sweep.load_spec(args.config, args.overrides)
    summary = sweep.run(spec, base)
    print(sweep.format_summary(summary, spec.search.metric))
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from tuning import ablate

    cfg = config_mod.load(args.config, args.overrides)
    result = ablate.run(cfg, args.losses, args.seeds, variants=args.variants)
    ablate.write_table(result, args.out)
    print(result["table"])
    print(f"\n{len(result['rows'])} runs in {result['seconds'] / 60:.1f} min; table in {args.out}; "
          f"MLflow parent run {result['parent_run_id']} (ablation.md, ablation_recall_at_1.png)")
    return 0


def cmd_package(args: argparse.Namespace) -> int:
    import tempfile

    from deploy.package import package
    from pipeline import tracking

    uri = tracking.resolve_uri(Config().tracking)
    with tempfile.TemporaryDirectory(prefix="gdml-pkg-") as tmp:
        checkpoint = tracking.download_checkpoint(uri, args.run, tmp) if args.run else str(args.checkpoint)
        done = package(checkpoint, args.name, args.alias, args.gallery, args.data_root, uri,
                       ivf_threshold=args.ivf_threshold, nprobe=args.nprobe, source_run=args.run)
    print(f"registered {done.registered} version {done.version} ({done.index_kind} index over {done.gallery_size} "
          f"gallery images) as {done.model_uri}")
    print(f"serve it (venv active):  MLFLOW_TRACKING_URI={uri} mlflow models serve -m {done.model_uri} "
          "--env-manager local -p 5001")
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from deploy.package import query

    missing = [str(p) for p in args.images if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"no such image: {', '.join(missing)}")
    try:
        results = query(args.model, [p.read_bytes() for p in args.images], args.k)
    except MlflowException as err:
        raise FileNotFoundError(f"--model {args.model}: {str(err).splitlines()[0]}") from None
    for path, result in zip(args.images, results):
        print(path)
        if "error" in result:
            print(f"  error: {result['error']}")
            continue
        for rank, (label, gpath, score) in enumerate(zip(result["labels"], result["paths"], result["scores"]), 1):
            print(f"  {rank:>2}. {score:7.4f}  {label}  ({gpath})")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from pipeline.tracking import replay_journal

    if not args.journal.is_file():
        raise FileNotFoundError(f"no journal at {args.journal}")
    sent, left = replay_journal(args.journal, args.wait)
    print(f"sent {sent} tracking writes" + (f"; {left} still unsent (the server did not answer): {args.journal}"
                                            if left else ""))
    return 1 if left else 0


def cmd_backbones(args: argparse.Namespace) -> int:
    from pipeline.model.backbone import BACKBONES, TIMM_PREFIX, Backbone

    if args.timm:
        return _list_timm(args.timm, args.image_size)
    for name, spec in BACKBONES.items():
        blocks = spec.blocks(None)
        net = Backbone(name, list(blocks), probe_size=args.image_size)
        print(f"{name}  (default taps: {', '.join(spec.default_taps(None))})")
        for tap in [*blocks, "last"]:
            info = net.info[tap]
            print(f"  {tap:<16} channels {info.channels:>5}   stride {info.reduction:>3}")
    print(f"\n{TIMM_PREFIX}<model name>: any timm model ({_timm_count()} here), its taps named as timm names its "
          "feature levels; `gdml backbones --timm 'vit_small*'` lists them. Vision Transformers give tokens, taken as "
          "maps on their patch grid (the class token is the last layer's feature).")
    return 0


def _timm_count() -> int:
    import timm

    return len(timm.list_models())


def _list_timm(pattern: str, image_size: int, limit: int = 25) -> int:
    """timm models matching a pattern with their taps (names, channels, strides from timm's feature_info)."""
    import timm
    import torch

    from pipeline.model.backbone import TIMM_PREFIX, backbone_spec

    names = timm.list_models(pattern)
    if not names:
        print(f"no timm model matches {pattern!r}", file=sys.stderr)
        return 1
    for name in names[:limit]:
        spec = backbone_spec(TIMM_PREFIX + name)
        with torch.device("meta"):
            net = spec.build(image_size)
        print(f"{TIMM_PREFIX}{name}  (default taps: {', '.join(spec.default_taps(net))})")
        for info in getattr(net, "feature_info", []):
            print(f"  {info['module']:<16} channels {info['num_chs']:>5}   stride {info['reduction']:>3}")
    if len(names) > limit:
        print(f"... and {len(names) - limit} more: narrow the pattern")
    return 0


COMMANDS = {"train": cmd_train, "demo": cmd_demo, "shards": cmd_shards, "backbones": cmd_backbones, "eval": cmd_eval,
            "tune": cmd_tune, "package": cmd_package, "query": cmd_query,
            "ablate": cmd_ablate, "replay": cmd_replay}


def main(argv: list[str] | None = None) -> int:
    from pipeline.tracking import fail_fast_http

    args = _parser().parse_args(argv)
    os.environ["GDML_COMMAND"] = f"gdml {args.command}"  # the runs' mlflow.source.name (Ray workers inherit it)
    fail_fast_http()
    from pipeline.console import interrupt_on_sigterm

    interrupt_on_sigterm()  # SIGTERM ends a run as Ctrl-C does: KILLED, Ray shut down
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipeline").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    from pipeline.console import RayConsole

    RayConsole.verbose = args.verbose
    ray_before = _ray_running()
    try:
        return COMMANDS[args.command](args)
    except ConfigError as err:
        print(f"gdml: config error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"gdml: {err}", file=sys.stderr)
        return 2
    except GdmlError as err:
        print(f"gdml: {' '.join(str(err).split())}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("gdml: interrupted; the MLflow run is marked KILLED, and running it again with the same "
              "train.name resumes it from its last checkpoint", file=sys.stderr)
        return 130
    finally:
        if not ray_before:
            _shutdown_ray()


def _ray_running() -> bool:
    if "ray" not in sys.modules:
        return False
    import ray

    return ray.is_initialized()


def _shutdown_ray() -> None:
    """Ray started by the command (training, sweeps) goes down with it, also on Ctrl-C or SIGTERM."""
    if _ray_running():
        import ray

        ray.shutdown()



if __name__ == "__main__":
    sys.exit(main())
