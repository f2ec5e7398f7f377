"""A bounded queue in front of the decoding slots: a request waits for a free slot, or is turned away.

At most ``max_waiting`` requests wait; one more is refused at once (``QueueFull``: the server
answers 429). A request that waited ``timeout`` seconds without a slot gets ``QueueTimeout``
(503). Both carry a Retry-After hint. Every slot handed out is given back exactly once through
its ``Lease``, whichever of the response or its cleanup gets there first.
"""

from __future__ import annotations

import asyncio
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class QueueFull(Exception):
    """Every slot is busy and the waiting line is full."""


class QueueTimeout(Exception):
    """No slot came free within the request's timeout."""


class Lease(Generic[T]):
    """One slot lent to one request; ``release`` is idempotent."""

    def __init__(self, pool: "SlotPool[T]", slot: T) -> None:
        self.pool, self.slot, self.released = pool, slot, False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.pool.give_back(self.slot)


class SlotPool(Generic[T]):
    """The free slots, and a count of the requests waiting for one (created inside the event loop)."""

    def __init__(self, slots: list[T], max_waiting: int) -> None:
        self.size = len(slots)
        self.max_waiting = max_waiting
        self.free: asyncio.Queue[T] = asyncio.Queue()
        for slot in slots:
            self.free.put_nowait(slot)
        self.waiting = 0

    @property
    def busy(self) -> int:
        return self.size - self.free.qsize()

    async def acquire(self, timeout: float) -> Lease[T]:
        if self.free.empty() and self.waiting >= self.max_waiting:
            raise QueueFull
        self.waiting += 1
        try:
            slot = await asyncio.wait_for(self.free.get(), timeout)
        except asyncio.TimeoutError:
            raise QueueTimeout from None
        finally:
            self.waiting -= 1
        return Lease(self, slot)

    def give_back(self, slot: Any) -> None:
        self.free.put_nowait(slot)
