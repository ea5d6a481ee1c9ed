"""Before any work: the config's paths made absolute, every check that needs no data (backbone, taps, loss,
weights, device, storage), the tracking server, the checks on the data's plan; then the shards. Each problem is
one ``ConfigError`` line naming the key, raised before anything is trained, built or logged."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline import tracking
from pipeline.config import Config, ConfigError, with_values
from pipeline.data import shards
from pipeline.data.manifest import Manifest
from pipeline.paths import absolute, is_remote

log = logging.getLogger(__name__)


def resolve_paths(cfg: Config) -> Config:
    """Absolute paths for everything a worker touches (Ray workers run in their own directories)."""
    return with_values(cfg, {"data.root": absolute(cfg.data.root),
                             "data.path": absolute(cfg.data.path) if cfg.data.path else None,
                             "train.storage_path": absolute(cfg.train.storage_path),
                             "tracking.uri": tracking.resolve_uri(cfg.tracking)})


def check_model(cfg: Config) -> None:
    """Config checks that need the backbone or the loss (still before any work)."""
    from pipeline.model.backbone import TIMM_PREFIX, check_taps, timm_problem
    from pipeline.model.embedder import resolved_taps
    from pipeline.objectives import check_params

    problem = timm_problem(cfg.model.backbone) if cfg.model.backbone.startswith(TIMM_PREFIX) else None
    if problem:
        raise ConfigError(f"model.backbone: {problem}")
    if cfg.model.attention.enabled:
        taps = resolved_taps(cfg.model, cfg.data.image_size)
        if not taps:
            raise ConfigError("model.attention.taps: empty; name at least one layer "
                              "(or set model.attention.enabled=false)")
        problem = check_taps(cfg.model.backbone, taps, cfg.data.image_size)
        if problem:
            raise ConfigError(f"model.attention.taps: {problem}")
    adv = cfg.model.adversary
    if adv.enabled and adv.input == "taps" and not (cfg.model.attention.enabled and
                                                    resolved_taps(cfg.model, cfg.data.image_size)):
        raise ConfigError("model.adversary.input: taps needs the attention over taps on (model.attention.enabled)")
    problem = check_params(cfg.loss)
    if problem:
        raise ConfigError(f"loss.params: {problem}")
    pretrained = cfg.model.pretrained
    if pretrained and pretrained != "imagenet" and not Path(pretrained).is_file():
        raise ConfigError(f"model.pretrained: {pretrained} does not exist (expected 'imagenet' or a weights file)")
    if pretrained == "imagenet":
        from pipeline.model.backbone import backbone_spec

        problem = backbone_spec(cfg.model.backbone).imagenet_problem()
        if problem:
            raise ConfigError(f"model.pretrained: imagenet for {cfg.model.backbone}: {problem}")


def check_config(cfg: Config, local: bool) -> None:
    """Every check that needs no data, before any work: model, loss, weights, device, where checkpoints go."""
    check_model(cfg)
    check_device(cfg, local)
    if local and is_remote(cfg.train.storage_path):
        raise ConfigError(f"train.storage_path: local mode keeps checkpoints on a local path, got "
                          f"{cfg.train.storage_path}")


def prepare(cfg: Config, local: bool) -> tuple[Config, str | None, dict[str, Any]]:
    """Everything before training, in the order that does no work before it is known to be worth it: config
    checks, the Ray cluster (joined, or a local one started), the tracking server, the data checks (on the shards,
    or on the plan of those to build), then the shards. (resolved config, tracking URI or None, manifest)."""
    cfg = resolve_paths(cfg)
    check_config(cfg, local)
    if not local:
        from pipeline.console import init_ray

        init_ray()
    uri = open_tracking(cfg)
    check_data(cfg, shards.current_or_planned(cfg.data), 1 if local else cfg.train.workers)
    return cfg, uri, shards.ensure(cfg.data)


def check_device(cfg: Config, local: bool) -> None:
    """``train.device=cuda`` needs a GPU: in this process (local mode) or in the Ray cluster, where the run must also
    fit the nodes the cluster has or can start. In local mode a GPU that torch cannot use is an error too
    (``runtime.unusable_gpu``), never a silent CPU run."""
    if local:
        from pipeline.runtime import Capabilities, decide_device, nvidia_devices, unusable_gpu

        caps = Capabilities.detect()
        problem = unusable_gpu(cfg.train.device, caps.cuda, 0, nvidia_devices())
        if problem:
            raise ConfigError(problem)
        decide_device(cfg.train.device, caps)  # cuda without a visible GPU: one line
        return
    from pipeline import cluster
    from pipeline.console import init_ray

    init_ray()
    cluster.check_fits(cfg, cluster.inspect(cfg))  # a run no node (type) of the cluster can ever hold: one line


def check_data(cfg: Config, manifest: Manifest, world_size: int) -> None:
    """Checks that need the manifest: is there enough data for one batch on every rank and loader worker?"""
    from pipeline.data.stream import batches_per_slot, training_plan

    try:
        plan = training_plan(manifest, cfg, world_size)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    s = cfg.sampler
    if plan.classes < s.classes_per_batch:
        raise ConfigError(f"sampler.classes_per_batch: {s.classes_per_batch} classes per batch, but "
                          f"{cfg.data.root} has {plan.classes} training classes")
    workers = max(1, plan.loader_workers)
    if batches_per_slot(plan.units, world_size * workers, s.classes_per_batch, pad=False) == 0:
        unit = "classes" if s.epoch == "classes" else f"groups of {s.images_per_class} images"
        raise ConfigError(
            f"sampler.classes_per_batch: {s.classes_per_batch} per batch x {world_size} ranks x {workers} loader "
            f"workers needs at least {world_size * workers * s.classes_per_batch} {unit} per epoch; {cfg.data.root} "
            f"has {plan.units} (fewer loader workers, ranks or classes per batch; or sampler.epoch=images)")


def open_tracking(cfg: Config) -> str | None:
    """The tracking URI, checked before any training: unreachable -> stop (or, if not required, go untracked)."""
    uri = cfg.tracking.uri
    assert uri is not None
    problem = tracking.check_reachable(uri)
    if problem is None:
        return uri
    if cfg.tracking.required:
        raise tracking.TrackingUnavailable(f"{problem}; nothing was trained. Start it, point MLFLOW_TRACKING_URI "
                                           "elsewhere, or set tracking.required=false to train untracked")
    log.warning("!!! %s: training WITHOUT tracking (tracking.required=false); nothing goes to MLflow !!!", problem)
    return None
