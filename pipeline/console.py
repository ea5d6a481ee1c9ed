"""The driver's console and signals around Ray: one Ray per driver (``init_ray``: it says which, and does not wait
on a cluster that is gone), Ray's own log lines kept out of the console (``RayConsole``), SIGTERM handled as
Ctrl-C."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from pathlib import Path
from typing import Any, Iterator

from pipeline.errors import GdmlError

JOIN_TIMEOUT = 10.0
"""Seconds a cluster's address has to answer before gdml says it is gone (Ray itself would retry for minutes)."""


def interactive() -> bool:
    """Whether the console is a terminal: progress bars there; elsewhere (a log file, CI, a cluster job's log) one
    line per epoch instead, since each redraw of a bar would be a new line."""
    import sys

    return sys.stdout.isatty() and sys.stderr.isatty()


class ClusterUnreachable(GdmlError):
    """The Ray cluster gdml was told to join (``RAY_ADDRESS``, or the one ``ray start`` recorded) does not answer."""

    exit_code = 2

_INTERRUPT_ON_SIGTERM = False


def _terminate(signum: int, frame) -> None:  # noqa: ANN001 - signal handler signature
    raise KeyboardInterrupt(f"signal {signum}")


def interrupt_on_sigterm() -> None:
    """SIGTERM ends a run as Ctrl-C does (the MLflow run KILLED, Ray shut down). Ray's driver installs its own
    handler when it starts (which aborts the process), so ``init_ray`` puts this one back."""
    global _INTERRUPT_ON_SIGTERM
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
        _INTERRUPT_ON_SIGTERM = True


class RayConsole:
    """What reaches the console from Ray's processes: the workers' progress bars and gdml's own lines; Ray's own
    lines (Train's per-report INFO records, the controller's core-worker messages, raylet notes) go to the run's
    log file instead, whose path is printed once (outside a run they stay in Ray's own session logs only).
    ``verbose`` (``gdml -v``) shows everything, as Ray would."""

    verbose = False
    log_path: Path | None = None
    announced: set[str] = set()

    @classmethod
    def install(cls) -> None:
        """Wrap the function the Ray driver prints forwarded worker lines with (looked up at each call)."""
        import ray._private.worker as ray_worker
        from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

        original = ray_worker.print_worker_logs
        if getattr(original, "_gdml", False):
            return

        def route(data: dict, print_file: Any, ignore_prefix: bool = False) -> None:
            lines = data.get("lines", [])
            if cls.verbose:
                return original(data, print_file, ignore_prefix)
            if not interactive():  # a log file gets no colour codes (Ray reads this as it prints each batch)
                os.environ.setdefault("RAY_COLOR_PREFIX", "0")
            shown = [line for line in lines if RAY_TQDM_MAGIC in line or "gdml:" in line]
            hidden = [line for line in lines if line not in shown]
            if hidden and cls.log_path is not None:
                try:  # (not its folder again: a run's folder removed after it ends stays removed)
                    with cls.log_path.open("a") as f:
                        f.writelines(f"({data.get('actor_name') or data.get('task_name') or ''} pid={data.get('pid')})"
                                     f" {line}\n" for line in hidden)
                except OSError:
                    pass
            if shown:
                original({**data, "lines": shown}, print_file, ignore_prefix)

        route._gdml = True
        ray_worker.print_worker_logs = route

    @staticmethod
    def clear_bars() -> None:
        """Forget the finished run's bars (Ray's bar manager would draw them again after every later line)."""
        from ray.experimental import tqdm_ray

        manager = tqdm_ray.instance()
        with manager.lock:
            manager.hide_bars()
            manager.bar_groups.clear()
            manager.in_hidden_state, manager.num_hides = False, 0

    @classmethod
    @contextlib.contextmanager
    def for_run(cls, path: Path, progress: bool) -> Iterator[None]:
        """Ray's own lines go to ``path`` while the block runs (Ray goes on printing after a run, e.g. the
        autoscaler's status; those lines are the session logs' again), then to the log of the run around it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        before, cls.log_path = cls.log_path, path
        if progress and not cls.verbose and str(path) not in cls.announced:
            cls.announced.add(str(path))
            print(f"gdml: Ray's own log lines for this run go to {path} (gdml -v shows them here)", flush=True)
        try:
            yield
        finally:
            cls.log_path = before


def cluster_address() -> tuple[str | None, str]:
    """(the Ray cluster that ``ray.init()`` would join, where that address comes from); None: a new local Ray."""
    from ray._private.services import get_ray_address_from_environment

    source = "RAY_ADDRESS" if os.environ.get("RAY_ADDRESS") else "the cluster `ray start` recorded on this machine"
    return get_ray_address_from_environment(None, None), source


def _answers(address: str, timeout: float) -> bool:
    """Whether something listens at a ``host:port`` address (other forms, ``ray://`` or ``http://``, are Ray's)."""
    host, _, port = address.rpartition(":")
    if "://" in address or not port.isdigit():
        return True
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def init_ray() -> None:
    import ray

    if not ray.is_initialized():
        address, source = cluster_address()
        if address is None:
            print("gdml: Ray: a new local instance (no RAY_ADDRESS; no cluster recorded by `ray start`)", flush=True)
        else:
            print(f"gdml: Ray: joining the cluster at {address} ({source})", flush=True)
            if not _answers(address, JOIN_TIMEOUT):
                raise ClusterUnreachable(
                    f"no Ray cluster answers at {address} ({source}) within {JOIN_TIMEOUT:.0f} s; if it is gone, "
                    "`ray stop` clears the recorded address (or unset RAY_ADDRESS), or train with --local")
        # Ray's own default is kept: token authentication on a new local Ray (its dashboard and Jobs API, which
        # run code, refuse a client without the token); RAY_AUTH_MODE and RAY_AUTH_TOKEN set it for a cluster
        ray.init(logging_level=logging.WARNING, log_to_driver=True)
        if _INTERRUPT_ON_SIGTERM:
            interrupt_on_sigterm()
    RayConsole.install()
