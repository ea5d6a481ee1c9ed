"""What the hardware under a training worker allows: precision, memory format, DDP backend.

Chosen automatically from what is present (``train.amp`` / ``train.channels_last`` may force a choice); the
selection is a pure function of the capabilities, so it is unit-tested on machines without a GPU.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Capabilities:
    cuda: bool
    bf16: bool = False

    @classmethod
    def detect(cls) -> "Capabilities":
        cuda = torch.cuda.is_available()
        return cls(cuda=cuda, bf16=cuda and torch.cuda.is_bf16_supported())


@dataclass(frozen=True)
class RuntimeChoice:
    device_type: str
    amp_dtype: torch.dtype | None
    """None: full float32."""
    grad_scaler: bool
    """fp16 needs loss scaling; bf16 and float32 do not."""
    channels_last: bool
    backend: str
    pin_memory: bool

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.amp_dtype)


def choose(caps: Capabilities, amp: str = "auto", channels_last: str = "auto") -> RuntimeChoice:
    """amp: auto | off | bf16 | fp16; channels_last: auto | on | off. On CPU, auto means float32, NCHW."""
    if amp not in ("auto", "off", "bf16", "fp16"):
        raise ValueError(f"train.amp: {amp!r}; allowed: auto, off, bf16, fp16")
    if amp == "auto":
        dtype = (torch.bfloat16 if caps.bf16 else torch.float16) if caps.cuda else None
    elif amp == "off":
        dtype = None
    else:
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    cl = caps.cuda if channels_last == "auto" else channels_last == "on"
    return RuntimeChoice(
        device_type="cuda" if caps.cuda else "cpu",
        amp_dtype=dtype,
        grad_scaler=dtype == torch.float16,
        channels_last=cl,
        backend="nccl" if caps.cuda else "gloo",
        pin_memory=caps.cuda,
    )
