"""One console line per restart of a run's Ray Train workers (Ray's own account of it is in the run's log file)."""

from __future__ import annotations

import sys
from typing import Any

from ray.train import UserCallback


class RestartNotice(UserCallback):
    """A Ray Train callback (it runs in Train's controller process, on the driver's node) that puts one ``gdml:``
    line on the console each time Ray Train restarts the workers after a failure: which rank failed, the
    checkpoint the run goes on from (the run's newest, as the workers' ``resume`` picks it), and the failures so
    far out of ``train.max_failures``."""

    def __init__(self, storage_path: str, name: str, max_failures: int) -> None:
        self.storage_path, self.name, self.max_failures = storage_path, name, max_failures
        self.failures = 0

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        from pipeline.checkpoint import CHECKPOINT_PREFIX, latest_checkpoint

        self.failures += 1
        if 0 <= self.max_failures < self.failures:
            return  # no restart: the run fails, and says so in one line
        latest = latest_checkpoint(self.storage_path, self.name)
        where = "the start (no checkpoint yet)" if latest is None else \
            f"the checkpoint of epoch {int(latest.rsplit(CHECKPOINT_PREFIX, 1)[-1])} ({latest})"
        allowed = "unlimited" if self.max_failures < 0 else str(self.max_failures)
        ranks = ", ".join(f"rank {r} ({type(e).__name__})" for r, e in sorted(worker_exceptions.items()))
        sys.stdout.write(f"gdml: {self.name}: lost {ranks}; Ray Train restarts the workers from {where} "
                         f"(failure {self.failures} of train.max_failures={allowed})\n")
        sys.stdout.flush()
