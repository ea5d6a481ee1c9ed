"""``make gpu-check`` can fail: on a machine whose GPUs torch cannot use it says why and exits 1 (checked here by
making this CPU machine look like one); without any GPU it says so and exits 0."""

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_exits_1_where_the_gpus_cannot_be_used_and_0_where_there_is_none(monkeypatch, capsys):
    from pipeline import runtime

    monkeypatch.chdir(ROOT)  # (the check runs from the repository root)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(runtime, "nvidia_devices", lambda: True)  # NVIDIA GPUs that torch does not see
    check = _gpu_check()
    with pytest.raises(SystemExit) as exited:
        check.main(["--skip-install"])
    out = capsys.readouterr().out
    assert exited.value.code == 1 and "driver is older than the CUDA" in out and check.FAILED == ["device"]

    monkeypatch.setattr(runtime, "nvidia_devices", lambda: False)  # no GPU at all: nothing to check
    check = _gpu_check()
    with pytest.raises(SystemExit) as exited:
        check.main(["--skip-install"])
    out = capsys.readouterr().out
    assert exited.value.code == 0 and "no CUDA device" in out and "RESULT gpu_train_vs_model_only=n/a" in out
