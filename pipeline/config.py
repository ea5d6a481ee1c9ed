"""The one typed configuration of a gdml run: loaded from YAML, overridden with ``--set key=value``.

Every component receives its own section (``cfg.model``, ``cfg.loss`` ...), never the whole config.
Errors are raised as :class:`ConfigError` with the dotted key and what is allowed, so the CLI can print
one line and exit with code 2 before any work starts.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline import names


class ConfigError(ValueError):
    """A configuration problem, already phrased as one line naming the key."""


def one_of(value: str, allowed: Iterable[str]) -> str:
    """``value`` if it is among ``allowed`` (a registry's names), else a ValueError listing them."""
    names = list(allowed)
    if value not in names:
        listed = ", ".join(repr(n) for n in names[:-1]) + f" or {names[-1]!r}" if len(names) > 1 else repr(names[0])
        raise ValueError(f"Input should be {listed}")
    return value


def Registry(allowed: Iterable[str]) -> Any:
    """A str field that must be one of a registry's names (``pipeline.names``)."""
    return Annotated[str, AfterValidator(lambda value: one_of(value, allowed))]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class DataConfig(_Section):
    source: Registry(names.SOURCES) = "emoji"
    """A source of ``pipeline.data.sources.SOURCES``: emoji (embedded), cub, cars196, sop, inshop (their published
    layouts under data.path), folder."""
    path: str | None = None
    """The raw dataset's folder (all sources but emoji)."""
    root: str = "data/emoji"
    """Where the shards and manifest.json live (built there on first use). Also s3://, gs://, http(s)://, or a
    'pipe:' command with {file} in it for reading."""
    image_size: int = Field(64, ge=16, le=512)
    """Side in pixels that images are drawn at and fed to the model."""
    styles: list[Literal["twemoji", "openmoji", "noto"]] = ["twemoji", "openmoji", "noto"]
    """Emoji vendor styles to use; a style whose package or font is missing is skipped with a note."""
    max_classes: int | None = Field(None, ge=4)
    """Keep only this many classes (evenly spread over code points): for tests and quick runs."""
    train_fraction: float = Field(0.5, gt=0.0, lt=1.0)
    """Sources without a published split (emoji, folder): the first fraction of classes trains."""
    train_classes: int | list[str] | None = None
    """folder source: the first N class folders (sorted) train, or the named ones; None: train_fraction."""
    shard_max_samples: int = Field(1000, ge=1)
    """Target samples per shard (a shard closes only at a class boundary)."""
    max_side: int | None = Field(None, ge=16)
    """Re-encode images so that their longer side is at most this (JPEG); None: keep the files as they are."""
    max_bad_fraction: float = Field(0.01, ge=0.0, le=1.0)
    """Building, and evaluating, fail if more than this fraction of images cannot be read (they are listed, or
    counted, either way)."""
    verify: bool = True
    """Check each shard's sha256 against the manifest as it is read to its end (training and evaluation): a shard
    altered after it was built stops the run with one line. Off: not checked; unreadable images are skipped and
    counted."""
    build_workers: int = Field(2, ge=1)
    """Processes that write shards in parallel."""


class SamplerConfig(_Section):
    classes_per_batch: int = Field(16, ge=2)
    """P: classes in every batch."""
    images_per_class: int = Field(4, ge=2)
    """m: images of each class in every batch; drawn with replacement (and augmented) when a class has fewer."""
    batch_size: int = Field(64, ge=4)
    """Per-rank batch size; must equal P x m."""
    epoch: Literal["classes", "images"] = "classes"
    """What one epoch is: classes = every class once, m images each (CUB: 100 classes / P = 7 steps of 64 images);
    images = every image once, in m-image groups per class (CUB: ~5,900 images / 64 = ~92 steps)."""
    loader_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    """Processes per training rank that read and decode (0: the training process itself); auto: one per CPU of
    the worker beyond the first (train.cpus_per_worker - 1), no more than give each at least one batch."""
    shuffle_buffer: int = Field(256, ge=1)
    """How many units (m encoded images of one class) the stream shuffles among, per loader worker."""
    remainder: Literal["pad", "drop"] = "pad"
    """Units left over after whole batches on every rank: pad (refill the last batches with the epoch's first
    units, so every class, or image, is seen each epoch) or drop (one strict pass; they wait for a later epoch)."""

    @model_validator(mode="after")
    def _batch_is_p_times_m(self) -> "SamplerConfig":
        if self.classes_per_batch * self.images_per_class != self.batch_size:
            raise ValueError(
                f"batch_size ({self.batch_size}) must equal classes_per_batch x images_per_class "
                f"({self.classes_per_batch} x {self.images_per_class} = "
                f"{self.classes_per_batch * self.images_per_class})"
            )
        return self


class AugmentConfig(_Section):
    crop_scale: tuple[float, float] = (0.6, 1.0)
    """RandomResizedCrop's scale range (the share of the image a crop keeps)."""
    flip: bool = True
    """Random horizontal flips."""
    color_jitter: float = Field(0.2, ge=0.0, le=1.0)
    """Brightness, contrast and saturation jitter."""


class AttentionConfig(_Section):
    enabled: bool = True
    """Off: the embedding comes from the last backbone layer alone (the baseline)."""
    kind: Registry(names.ATTENTION_KINDS) = "additive"
    """additive: 'Learn to Pay Attention'-style spatial attention queried by the last block; cbam: channel then
    spatial attention (CBAM); avg: plain global pooling (the ablation). See ``model.attention.KINDS``."""
    taps: list[str] | None = None
    """Intermediate backbone layers (submodule names) pooled into the embedding; None: the backbone's default."""
    width: int = Field(256, ge=8)
    """Common width each tap is projected to by a 1x1 convolution."""
    shared: bool = True
    """One attention module shared across taps (the lead design), or one per tap."""


class AdversaryConfig(_Section):
    enabled: bool = True
    """Off: no class-adversarial head (the baseline)."""
    weight: float = Field(0.1, ge=0.0)
    """lambda: the gradient-reversal coefficient (its final value when the schedule ramps)."""
    schedule: Literal["constant", "dann", "warmup"] = "dann"
    """dann: lambda * (2 / (1 + exp(-10 p)) - 1) with p the fraction of training done; warmup: 0 until the head's
    running accuracy on the training classes exceeds warmup_factor x chance, then the dann ramp over the rest."""
    warmup_factor: float = Field(2.0, gt=1.0)
    """warmup schedule: how far above chance (1 / training classes) the head must be before lambda ramps up."""
    input: Literal["features", "embedding", "taps"] = "features"
    """features: the fused pooled features before the embedding layer; embedding: the embedding itself; taps: the
    attention-pooled tap descriptors alone (the last layer's feature untouched by the adversary)."""
    mode: Registry(names.ADVERSARY_MODES) = "reversal"
    """reversal: gradient reversal (the features get -lambda times the head's gradient); confusion: the head
    learns to classify, the features learn to make its prediction uniform (lambda x cross-entropy to uniform)."""
    hidden: int = Field(512, ge=8)
    """The adversary's MLP hidden width."""
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    """The adversary's MLP dropout."""


class ModelConfig(_Section):
    backbone: str = "resnet18"
    """A backbone of ``pipeline.model.backbone.BACKBONES``, or ``timm/<model name>`` (any timm model)."""
    pretrained: str | None = None
    """None: random init; 'imagenet': ImageNet weights (shipped in a package for efficientnet_lite0, downloaded by
    torchvision for the others where the machine can); or the path of a local weights file."""
    freeze_bn: bool = False
    """Keep the backbone's BatchNorm statistics and affine weights fixed (standard in DML with pretrained weights)."""
    embedding_size: int = Field(128, ge=2)
    """Embedding dimension (the embedding is L2-normalised)."""
    fusion: Literal["concat", "sum"] = "concat"
    """concat: concatenate the last layer's pooled feature and the tap descriptors, then one linear layer;
    sum: a linear projection of each to the embedding size, summed."""
    attention: AttentionConfig = AttentionConfig()
    adversary: AdversaryConfig = AdversaryConfig()

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        if value.startswith(names.TIMM_PREFIX) and len(value) > len(names.TIMM_PREFIX):
            return value  # whether timm has the model is checked before any work (pipeline.preflight)
        try:
            return one_of(value, names.BACKBONES)
        except ValueError as err:
            raise ValueError(f"{err} (or timm/<model name>, e.g. timm/vit_small_patch16_224)") from None


class LossConfig(_Section):
    name: Registry(names.LOSSES) = "multi_similarity"
    """A loss of ``pipeline.objectives.LOSSES`` (pytorch-metric-learning)."""
    params: dict[str, float | int | bool | str] = {}
    """Keyword arguments of the pytorch-metric-learning loss (margins ...), checked against its signature."""


class TrainConfig(_Section):
    epochs: int = Field(3, ge=1)
    """Epochs to train."""
    lr: float = Field(1e-3, gt=0.0)
    """Learning rate of the backbone."""
    lr_heads: float = Field(1e-3, gt=0.0)
    """Learning rate of the attention and embedding layers."""
    lr_adversary: float | None = Field(None, gt=0.0)
    """Learning rate of the adversary's head; None: lr_heads."""
    lr_loss: float = Field(1e-2, gt=0.0)
    """Learning rate of the loss's own parameters (proxies)."""
    weight_decay: float = Field(1e-4, ge=0.0)
    """AdamW weight decay."""
    seed: int = 0
    """Seed of the weights, the sampling and the augmentation."""
    workers: int = Field(2, ge=1)
    """Ray Train workers (DDP ranks); ignored in local mode (one process)."""
    cpus_per_worker: int = Field(1, ge=1)
    """CPUs (and torch threads) per Ray Train worker; in local mode, torch threads."""
    device: Registry(names.DEVICES) = "auto"
    """auto: the GPU Ray Train gives each worker (local mode, evaluation, packaging, serving: CUDA where present),
    else the CPU; cpu or cuda force it (cuda without a visible GPU stops before any work)."""
    max_steps_per_epoch: int | None = Field(None, ge=1)
    """Cap steps per epoch (quick runs, tests)."""
    storage_path: str = "ray_results"
    """Where checkpoints go: a local path (made absolute; Ray needs it so) or s3:// / gs://."""
    name: str | None = None
    """Run name (default: derived from the variant and time). Running again with the same name resumes it."""
    val_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    """Hold out this fraction of the *training* classes (class-disjoint) and report val/* metrics every epoch:
    what sweeps choose by; the test classes are never used to choose. 0: no validation."""
    cluster_file: str | None = None
    """A Ray cluster launcher file (``ray_cluster.yaml``) whose node types the cluster's autoscaler starts: what a
    run can ask for is read from it, not from the nodes up at submit. Default: ``~/ray_bootstrapped_config.yaml``
    where present (a head started by ``ray up``), else the nodes up now."""
    max_failures: int = Field(2, ge=-1)
    """Ray Train restarts after a worker is lost, each from the last checkpoint (-1: no limit)."""
    nonfinite: Literal["stop", "skip"] = "stop"
    """A NaN/inf loss or gradient: stop with a message naming epoch, step and term, or skip the step (counted)."""
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    """Mixed precision: auto = bf16 on GPUs that support it, fp16 with loss scaling on others, off on CPU."""
    deterministic: bool = False
    """On a GPU: deterministic kernels only and no cuDNN autotuning (slower), so that two runs of one config give
    the same weights there too. On CPU gdml is deterministic either way: the same seed gives the same weights (on
    the same machine type: another CPU's kernels may sum in another order)."""
    channels_last: Literal["auto", "on", "off"] = "auto"
    """Memory format of images and model: auto = channels_last on GPU."""


class FaultConfig(_Section):
    """Fault injection, for testing recovery: each fault happens once per run."""

    crash_rank: int | None = Field(None, ge=0)
    """The rank ``crash_step`` kills."""
    crash_step: int | None = Field(None, ge=1)
    """Kill worker ``crash_rank`` (its process exits) when it reaches this global step."""
    nan_step: int | None = Field(None, ge=1)
    """Make the loss NaN at this global step."""
    nan_rank: int | None = Field(None, ge=0)
    """Only on this rank (None: on every rank); the others must then skip or stop alike."""
    pause_epoch: int | None = Field(None, ge=1)
    """Every rank stops before this epoch (1-based) until ``pause_file`` exists, having written
    ``<pause_file>.rank<r>`` (its process id) once it waits: a run held still at a known point, for tests that act
    on it there (kill a worker, stop a server, interrupt the driver)."""
    pause_file: str | None = None
    """The file that releases the ranks held before ``pause_epoch``."""


class TuneConfig(_Section):
    """Class-disjoint k-fold validation (sweeps): the training classes split into ``folds`` seeded folds."""

    folds: int = Field(1, ge=1)
    """1: the single held-out share ``train.val_fraction``; k > 1: a sweep trial trains k times, each run validated on
    one fold of the training classes (trained on the others), and is scored by the mean over folds (with its
    standard error)."""
    fold: int = Field(0, ge=0)
    """The fold this run holds out (0 .. folds-1; a sweep sets it)."""

    @model_validator(mode="after")
    def _fold_in_range(self) -> "TuneConfig":
        if self.folds > 1 and self.fold >= self.folds:
            raise ValueError(f"tune.fold={self.fold} needs to be below tune.folds={self.folds}")
        return self


class EvalConfig(_Section):
    recall_at: list[int] = [1, 2, 4, 8]
    """K of Recall@K (positive, at least one)."""
    batch_size: int = Field(256, ge=1)
    """Images per batch when embedding."""
    loader_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"
    """Processes decoding images while the model embeds; auto: on a GPU one per CPU beyond the first (at most 8
    and one per shard), on the CPU none."""
    gap_images: int = Field(512, ge=0)
    """Every epoch, Recall@1 and MAP@R on a fixed sample of this many seen-class images beside held-out classes
    (the generalisation gap, ``gap/*``); 0: off."""
    engine: Registry(names.ENGINES) = "auto"
    """How the metrics search: ranks (exact ranks of the relevant items: one fused CPU pass, or torch GEMM blocks
    on the GPU), knn (FAISS k-NN lists, which rank by float32 scores); auto: ranks on the evaluating device."""


    @field_validator("recall_at")
    @classmethod
    def _positive_ks(cls, value: list[int]) -> list[int]:
        if not value or min(value) < 1:
            raise ValueError("expected at least one K, each at least 1, e.g. [1, 2, 4, 8]")
        return sorted(set(value))


class TrackingConfig(_Section):
    uri: str | None = None
    """MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db."""
    experiment: str = "gdml"
    """MLflow experiment name."""
    required: bool = True
    """An unreachable tracking server stops the run before training; false: warn loudly and train untracked."""
    outage_wait: float = Field(120.0, ge=0.0)
    """A server that went away during the run: how many seconds the end of the run waits for it to answer again
    before leaving the unsent writes in the run's journal (``gdml replay`` sends them later). Training itself
    never waits."""
    system_metrics: bool = True
    """Log CPU, memory, disk, network and GPU use (MLflow's system metrics, ``system/*``) while a run trains."""
    system_metrics_interval: float = Field(10.0, gt=0.0)
    """Seconds between two samples of the system metrics."""


class Config(_Section):
    data: DataConfig = DataConfig()
    sampler: SamplerConfig = SamplerConfig()
    augment: AugmentConfig = AugmentConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    fault: FaultConfig = FaultConfig()
    tune: TuneConfig = TuneConfig()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def flat(self) -> dict[str, Any]:
        """Dotted-key view, as logged to MLflow params and addressed by sweeps."""
        out: dict[str, Any] = {}

        def walk(prefix: str, node: Any) -> None:
            if isinstance(node, dict) and (node or not prefix):
                for k, v in node.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = node

        walk("", self.to_dict())
        return out


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        parent = first["loc"][:-1]
        allowed = _allowed_keys(parent)
        msg = f"unknown key; allowed: {', '.join(allowed)}" if allowed else "unknown key"
    elif first["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")
    if first["type"] not in ("extra_forbidden", "missing") and "input" in first:
        msg += f" (got {first['input']!r})"
    return f"{key}: {msg}" if key else msg


def _allowed_keys(loc: tuple) -> list[str]:
    model: Any = Config
    for part in loc:
        field = model.model_fields.get(str(part)) if hasattr(model, "model_fields") else None
        if field is None or not (inspect.isclass(field.annotation) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return list(model.model_fields)


def parse_value(text: str) -> Any:
    """A ``--set`` value: YAML scalar or flow collection (``0.3``, ``true``, ``[layer2,layer3]``, ``null``)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """Set ``raw[a][b][c] = value`` for ``key = 'a.b.c'`` (in place), creating sections on the way."""
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {part!r} is a value, not a section")
        node = child
    node[leaf] = value
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set ``a.b.c=value`` entries (values parsed as YAML) into a nested dict (in place) and return it."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. model.adversary.weight=0.3")
        key, value = item.split("=", 1)
        set_dotted(raw, key, parse_value(value))
    return raw


def with_values(cfg: "Config", values: dict[str, Any]) -> "Config":
    """A validated copy of ``cfg`` with values set by dotted name (as sweeps and the CLI address them)."""
    raw = cfg.to_dict()
    for key, value in values.items():
        set_dotted(raw, key, value)
    return from_dict(raw)


def from_dict(raw: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def load(path: str | Path | None = None, overrides: list[str] | None = None,
         values: dict[str, Any] | None = None) -> Config:
    """Load a YAML config (or the defaults), set ``values`` (dotted name -> value), apply ``--set`` overrides
    (``key=value`` text) and validate everything."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a mapping of sections at the top level")
    for key, value in (values or {}).items():
        set_dotted(raw, key, value)
    apply_overrides(raw, overrides or [])
    return from_dict(raw)
