"""The one device and precision decision every stage that runs a model asks: pure functions of what is
requested and what the hardware offers (unit-tested without a GPU). Details: docs/internals.md.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline import names
from pipeline.config import ConfigError
from pipeline.errors import GdmlError

DEVICES = names.DEVICES


@dataclass(frozen=True)
class Capabilities:
    cuda: bool
    bf16: bool = False
    name: str = ""

    @classmethod
    def detect(cls) -> "Capabilities":
        if not torch.cuda.is_available():
            return cls(cuda=False)
        # native bf16 only (compute capability 8.0 and up): emulated bf16 autocast on older GPUs is slow
        return cls(cuda=True, bf16=torch.cuda.is_bf16_supported(including_emulation=False),
                   name=torch.cuda.get_device_name())


def decide_device(requested: str, caps: Capabilities, assigned: torch.device | None = None) -> torch.device:
    """The device to run on. ``assigned``: the device Ray Train gave this worker (None in local mode and outside
    training)."""
    if requested not in DEVICES:
        raise ConfigError(f"train.device: {requested!r}; allowed: {', '.join(DEVICES)}")
    if requested == "cpu":
        return torch.device("cpu")
    if assigned is not None and assigned.type == "cuda":
        return assigned
    if caps.cuda:
        return torch.device("cuda", 0) if assigned is None else torch.device("cuda", assigned.index or 0)
    if requested == "cuda":
        raise ConfigError("train.device: cuda was asked for, but no CUDA device is visible here "
                          "(set train.device=auto or cpu)")
    return torch.device("cpu")


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None
    """None: full float32."""
    grad_scaler: bool
    """fp16 needs loss scaling; bf16 and float32 do not."""
    channels_last: bool
    pin_memory: bool
    device_name: str = ""

    @property
    def device_type(self) -> str:
        return self.device.type

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def describe(self) -> str:
        """One line: device, precision, memory format (as logged to MLflow and printed)."""
        where = f"{self.device} ({self.device_name})" if self.device_name else str(self.device)
        precision = {None: "float32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + loss scaling"}
        return f"{where}, {precision[self.amp_dtype]}" + (", channels_last" if self.channels_last else "")


def choose(device: torch.device, caps: Capabilities, amp: str = "auto", channels_last: str = "auto") -> Runtime:
    """Precision and memory format for a device. amp: auto | off | bf16 | fp16; channels_last: auto | on | off.
    On CPU, auto means float32, NCHW."""
    gpu = device.type == "cuda"
    if amp == "auto":
        dtype = (torch.bfloat16 if caps.bf16 else torch.float16) if gpu else None
    elif amp == "off":
        dtype = None
    else:
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return Runtime(device=device, amp_dtype=dtype, grad_scaler=dtype == torch.float16,
                   channels_last=gpu if channels_last == "auto" else channels_last == "on",
                   pin_memory=gpu, device_name=caps.name if gpu else "")


class GpuUnusable(GdmlError):
    """This process was given a GPU (by Ray), or the machine has one, that torch cannot use."""

    exit_code = 2


def unusable_gpu(requested: str, torch_cuda: bool, gpus_given: int, nvidia_devices: bool) -> str | None:
    """Why a GPU that Ray gave this process (``gpus_given``) or that the machine has (``/dev/nvidia*``) cannot be
    used (torch sees no CUDA), or None. Training on the CPU of a GPU machine is never silent: only
    ``train.device=cpu`` asks for it."""
    if requested == "cpu" or torch_cuda:
        return None
    if gpus_given:
        where = f"Ray gave this worker {gpus_given} GPU(s)"
    elif nvidia_devices:
        where = "this machine has NVIDIA GPUs (/dev/nvidia*)"
    else:
        return None
    return (f"train.device: {where}, but torch {torch.__version__} sees no CUDA device: most likely the NVIDIA "
            f"driver is older than the CUDA {torch.version.cuda} build torch needs (update the driver), or set "
            "train.device=cpu to train on the CPU")


def nvidia_devices() -> bool:
    return any(Path("/dev").glob("nvidia[0-9]*"))


def worker_runtime(device: str, amp: str, channels_last: str, local: bool) -> Runtime:
    """The runtime of a training worker: Ray Train's device for it (when it runs under Ray Train), else the
    decision for this process. A GPU it was given that torch cannot use stops it (``unusable_gpu``)."""
    caps = Capabilities.detect()
    assigned, given = None, 0
    if not local:
        import ray

        given = len(ray.get_gpu_ids())
        if caps.cuda:
            import ray.train.torch

            assigned = ray.train.torch.get_device()
    problem = unusable_gpu(device, caps.cuda, given, nvidia_devices())
    if problem:
        raise GpuUnusable(problem)
    return choose(decide_device(device, caps, assigned), caps, amp, channels_last)


def inference_device(requested: str = "auto") -> torch.device:
    """Where evaluation, packaging and serving embed: CUDA where present, unless ``cpu`` is asked for. (A run that
    trains with ``cuda`` on a cluster is evaluated by a driver that may have no GPU: it then embeds on the CPU.)"""
    return decide_device("cpu" if requested == "cpu" else "auto", Capabilities.detect())
