"""Epoch pacing: hold a training's ranks before each epoch until whoever drives the run lets that epoch start.

A Ray Tune trial drives its Ray Train run through reports that travel asynchronously (worker -> Train
controller -> trial -> Tune's scheduler). Without pacing the workers go straight on into the next epoch while
the scheduler is still deciding, so a trial that ASHA stops at a rung has already paid for (much of) one more
epoch: with a grace period of one epoch that doubles the cost of every trial stopped at the first rung. With an
``EpochGate`` in the worker's config (``epoch_gate``), every rank waits before epoch ``e`` (0-based) until the
driver has let ``e + 1`` epochs start, which a sweep's trial does once Tune has accepted the report of epoch
``e`` (1-based: the one before).
The wait is one round trip per epoch (well under a second); a stopped trial ends while its ranks wait.
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
