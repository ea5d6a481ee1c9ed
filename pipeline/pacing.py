"""Epoch pacing: every rank waits before each epoch until the trial driving the run lets it start (once Tune
accepted the epoch before), so a trial ASHA stops at a rung trains no further. Details: docs/internals.md.
"""

from __future__ import annotations

import asyncio

import ray


@ray.remote(num_cpus=0)
class EpochGate:
    """How many epochs may have started; ranks wait on it, the driver opens it one epoch at a time."""

    def __init__(self) -> None:
        self._open = 1  # the first epoch needs nobody's leave
        self._changed = asyncio.Condition()

    async def open(self, epochs: int) -> None:
        """Let epochs up to ``epochs`` (count, 1-based: 2 means the second may start) begin."""
        async with self._changed:
            self._open = max(self._open, epochs)
            self._changed.notify_all()

    async def wait(self, epoch: int) -> None:
        """Return once epoch ``epoch`` (0-based) may start."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._open > epoch)
