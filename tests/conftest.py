"""Shared fixtures, and what the suite may leave behind.

- Tiny emoji shards, built once per session; a config small enough for a unit test (:func:`tiny_config`).
- One Ray runtime (``shared_ray``) for the tests that can share it: ``ray.init`` and the first workers cost seconds,
  paid once; tests that start a Ray head of their own ask for ``no_shared_ray`` first.
- One real MLflow server (``mlflow_server``) and one trained tiny model logged to it (``trained``): the CLI,
  evaluation, packaging, serving and the exact-resume test all use that run instead of training their own.
- Every test gets its environment variables and MLflow's tracking/registry URIs back as they were.
- At the end of the session, a process the suite started that is still alive (a Ray, an MLflow server, a served
  model; killed then), or a staging folder left in the temporary directory, fails the run. Orphans are found
  because this process makes itself their "subreaper": a process whose parent dies is re-parented here, not to
  init, so every process the suite started stays among its descendants.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline import config as config_mod
from pipeline.config import Config

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # the suite's own throwaway Ray runtimes, on the loopback only
os.environ.setdefault("TQDM_DISABLE", "1")
# Ray Train's controller polls its workers every 2 s by default, so a run's end, a lost worker and every report that
# Tune paces epochs by reach it up to 2 s late: the suite's runs last seconds, so its throwaway runtimes poll often
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

MACHINE_TMP = Path(tempfile.gettempdir())
SUITE_TMP = Path(tempfile.mkdtemp(prefix="gdml-suite-", dir=MACHINE_TMP))
"""The suite's own temporary folder: this process and every process it starts (Ray runtimes and their workers,
servers, commands) write their temporary files there, Ray its session folders too; it is removed when the
suite passes (kept, and named, when it fails: the failed tests' folders are in it)."""
os.environ["TMPDIR"] = str(SUITE_TMP)
tempfile.tempdir = str(SUITE_TMP)

TINY = {
    "model.backbone": "timm/test_resnet",  # a 0.4M-parameter ResNet (timm's test model): small steps, small checkpoints
    "model.pretrained": "null",
    "model.attention.taps": "[layer2,layer3]",
    "data.max_classes": 48,
    "data.image_size": 32,
    "data.shard_max_samples": 20,  # several uneven shards per split
    "sampler.classes_per_batch": 4,
    "sampler.images_per_class": 3,
    "sampler.batch_size": 12,
    "model.embedding_size": 16,
    "model.attention.width": 16,
    "model.adversary.hidden": 32,
    "train.epochs": 1,
    "train.cpus_per_worker": 1,
    "tracking.system_metrics": "false",  # on only where a test looks at them (SYSTEM_METRICS)
}


SYSTEM_METRICS = {"tracking.system_metrics": "true", "tracking.system_metrics_interval": 0.1}
"""System metrics sampled often enough to draw curves (several samples) even in a run of seconds."""


def tiny_config(tmp: Path, **overrides: object) -> Config:
    """A config small enough for a unit test, rooted in ``tmp`` (shards may live elsewhere)."""
    values = {**TINY, "train.storage_path": str(tmp / "ray"), "tracking.uri": f"sqlite:///{tmp / 'mlflow.db'}",
              "tracking.experiment": "tests", **overrides}
    return config_mod.load(None, [f"{k}={v}" for k, v in values.items()])


def cli_args(overrides: dict[str, object]) -> list[str]:
    """``--set key=value`` for each override (the CLI's form)."""
    return [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]


def wait_for(condition, timeout: float, what: str, interval: float = 0.1):
    """Wait until ``condition()`` returns something true (returned), or fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_group(process: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM to the process group a child leads (``start_new_session=True``), SIGKILL if it outlives
    ``timeout``: servers start workers of their own, which ``terminate()`` of the parent alone would orphan."""
    if process.poll() is None:
        with _suppress_missing():
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    with _suppress_missing():
        os.killpg(process.pid, signal.SIGKILL)  # whatever of the group is left
    process.wait(timeout=timeout)


def shutdown_ray_and_wait(timeout: float = 60.0) -> None:
    """Shut this process's Ray runtime down and return once every process of it has exited (so that nothing it
    ran can still write)."""
    import psutil
    import ray

    def is_ray(proc: psutil.Process) -> bool:
        try:
            return "ray" in " ".join(proc.cmdline()).lower()
        except psutil.Error:
            return False

    procs = [p for p in psutil.Process().children(recursive=True) if is_ray(p)]
    ray.shutdown()
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    assert not alive, f"Ray processes still running {timeout:.0f} s after shutdown: {[p.pid for p in alive]}"


def _suppress_missing():
    import contextlib

    return contextlib.suppress(ProcessLookupError, PermissionError)


class MlflowServer:
    """``mlflow server`` on the loopback with a SQLite store and proxied artifacts, in its own process group."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.port = tmp, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.tmp / 'server.db'}",
             "--artifacts-destination", str(self.tmp / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"],
            stdout=open(self.tmp / "server.log", "a"), stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"})
        import requests

        def healthy() -> bool:
            assert self.process.poll() is None, f"mlflow server exited: {self.log()[-2000:]}"
            try:
                return requests.get(f"{self.uri}/health", timeout=1).ok
            except requests.RequestException:
                return False

        wait_for(healthy, timeout, f"the MLflow server at {self.uri} to answer /health", interval=0.25)

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process)

    def log(self) -> str:
        path = self.tmp / "server.log"
        return path.read_text() if path.is_file() else ""


# -- fixtures ---------------------------------------------------------------------------------------------------------

_SESSION_ENV: set[str] = set()
"""Variables set by session-wide fixtures (the shared Ray runtime's own): kept when a test's environment is put
back."""


@pytest.fixture(autouse=True)
def _restore_environment():
    """Environment variables and MLflow's tracking and registry URIs as they were before the test."""
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    env = dict(os.environ)
    uris = (tracking_utils._tracking_uri, registry_utils._registry_uri)
    yield
    for key in set(os.environ) - set(env) - _SESSION_ENV:
        del os.environ[key]
    for key, value in env.items():
        if os.environ.get(key) != value and key not in _SESSION_ENV:
            os.environ[key] = value
    tracking_utils._tracking_uri, registry_utils._registry_uri = uris


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.data import shards

    root = tmp_path_factory.mktemp("shards") / "emoji"
    cfg = tiny_config(root.parent, **{"data.root": str(root)})
    shards.build(cfg.data)
    return root


@pytest.fixture()
def tiny_cfg(tmp_path: Path, tiny_shards: Path) -> Config:
    return tiny_config(tmp_path, **{"data.root": str(tiny_shards)})


@pytest.fixture(scope="session")
def _ray_runtime():
    import ray

    from pipeline.console import init_ray

    before = dict(os.environ)
    init_ray()
    _SESSION_ENV.update(k for k, v in os.environ.items() if before.get(k) != v)
    yield
    ray.shutdown()


@pytest.fixture()
def shared_ray(_ray_runtime) -> None:
    """The session's Ray runtime (started again if a test before this one shut it down)."""
    from pipeline.console import init_ray

    init_ray()


@pytest.fixture()
def no_shared_ray() -> None:
    """For tests that start a Ray head of their own: the session's runtime is shut down first."""
    import ray

    ray.shutdown()


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture()
def gdml(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):
    """``gdml(*args, cwd=..., env=...)`` runs the command in this process (``cli.main``, the code behind the
    ``gdml`` script, without a second interpreter's imports) and returns its exit code, stdout and stderr."""
    from pipeline import cli

    def run(*args: object, cwd: Path | None = None, env: dict[str, str] | None = None) -> CliResult:
        if cwd is not None:
            monkeypatch.chdir(cwd)
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        capsys.readouterr()
        try:
            code = cli.main([str(a) for a in args])
        except SystemExit as exited:  # argparse
            code = exited.code
        out = capsys.readouterr()
        return CliResult(code, out.out, out.err)

    return run


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()


@dataclass
class Trained:
    """The session's trained tiny model: a 2-epoch local run logged to the session's MLflow server."""

    result: object
    """``pipeline.launch.RunResult``."""
    cfg: Config
    tmp: Path


TRAINED_EPOCHS = 2


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_shards: Path, mlflow_server: MlflowServer) -> Trained:
    from pipeline.launch import train_and_evaluate

    tmp = tmp_path_factory.mktemp("trained")
    cfg = tiny_config(tmp, **{"data.root": str(tiny_shards), "train.epochs": TRAINED_EPOCHS,
                              "train.name": "straight", "tracking.uri": mlflow_server.uri, **SYSTEM_METRICS})
    return Trained(train_and_evaluate(cfg, local=True, progress=False), cfg, tmp)


# -- the session: GPU tests, what it leaves behind ------------------------------------------------------------------

STAGING = "gdml-*"
"""Temporary folders gdml makes (checkpoint staging, figures, evaluation downloads): each must be gone when the
code that made it is done. (``pymp-*`` folders are left by processes that are killed, Ray's own among them when a
runtime shuts down: they go with the suite's folder.)"""
_BEFORE = pytest.StashKey[dict]()


def _staging() -> set[Path]:
    """gdml's staging folders in the suite's temporary folder and in the machine's."""
    return {p for tmp in (SUITE_TMP, MACHINE_TMP) for p in tmp.glob(STAGING) if not p.name.startswith("gdml-suite-")}


def pytest_sessionstart(session: pytest.Session) -> None:
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans come to us
    session.config.stash[_BEFORE] = {"staging": _staging()}


_REPORTED: list[str] = []
"""Why the run failed after its tests passed (said again below the summary line, where a log's tail shows it)."""


def _report(session: pytest.Session, line: str) -> None:
    _REPORTED.append(line)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(line, red=True, bold=True)
    else:
        print(line, file=sys.stderr)


def _leftover_processes(session: pytest.Session) -> None:
    """Processes the suite started that outlived it: listed, killed, and the run marked failed."""
    import psutil

    def alive() -> list[psutil.Process]:
        out = []
        for proc in psutil.Process().children(recursive=True):
            try:
                # (multiprocessing's resource tracker serves this interpreter, and ends with it)
                if proc.status() != psutil.STATUS_ZOMBIE and not any(
                        "multiprocessing.resource_tracker" in part for part in proc.cmdline()):
                    out.append(proc)
            except psutil.NoSuchProcess:
                pass
        return out

    _, left = psutil.wait_procs(alive(), timeout=30)  # a runtime shut down at the end takes a moment to go
    left = [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    if left:
        names = []
        for proc in left:
            try:
                names.append(f"{proc.pid} {' '.join(proc.cmdline())[:100]}")
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        if names:
            _report(session, f"the suite left {len(names)} process(es) running (killed now): " + "; ".join(names))
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
    while True:  # reap the orphans that were handed to us and have ended
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run on a process still alive or a staging folder left behind; then remove the suite's temporary
    folder (Ray's session folders, the passed tests' temporary trees), unless the run failed."""
    import atexit
    import shutil

    before = session.config.stash.get(_BEFORE, None)
    if before is None:
        return
    _leftover_processes(session)
    staging = sorted(_staging() - before["staging"])
    if staging:  # (listed, not removed: another program on the machine may be using one)
        _report(session, f"the suite left {len(staging)} staging folder(s): " + ", ".join(map(str, staging)))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if session.exitstatus == pytest.ExitCode.OK:
        # at the interpreter's exit too: pytest's own temporary-path plugin finishes after this hook and may make
        # its base folder again in here
        shutil.rmtree(SUITE_TMP, ignore_errors=True)
        atexit.register(shutil.rmtree, SUITE_TMP, True)
    else:
        _report(session, f"the suite's temporary folder is kept for a look: {SUITE_TMP}")


def pytest_unconfigure(config: pytest.Config) -> None:
    for line in _REPORTED:
        print(f"gdml suite: {line}", file=sys.stderr, flush=True)


def _gpu_unusable() -> str | None:
    """Why torch cannot use this machine's NVIDIA GPUs (a failed CUDA initialisation), or None."""
    from pipeline.runtime import nvidia_devices, unusable_gpu

    return unusable_gpu("auto", False, 0, nvidia_devices())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` need a CUDA device: skipped on a machine without one (``make gpu-check`` runs them on a
    GPU); where the machine has NVIDIA GPUs that torch cannot use they fail (``pytest_runtest_setup``)."""
    import torch

    if torch.cuda.is_available() or _gpu_unusable():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (make gpu-check runs these on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_setup(item: pytest.Item) -> None:
    import torch

    problem = _gpu_unusable() if "gpu" in item.keywords and not torch.cuda.is_available() else None
    if problem:
        pytest.fail(problem, pytrace=False)
