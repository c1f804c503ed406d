"""Request rates per caller: token buckets, in this process or (state/redis.py) shared through Redis."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol


class RateLimiter(Protocol):
    async def take(self, key: str) -> float:
        """Spend one request of `key`'s bucket: 0 if it had one, else the seconds until it will."""
        ...


class TokenBuckets:
    """`rate` requests per second with bursts up to `burst`, per key. A full bucket is the same as no
    bucket, so full ones are dropped once there are many: memory stays bounded by the active callers."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self.buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)
        self.prune_above = 10_000

    async def take(self, key: str) -> float:
        now = self.clock()
        tokens, at = self.buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens < 1:
            self.buckets[key] = (tokens, now)
            return (1 - tokens) / self.rate
        self.buckets[key] = (tokens - 1, now)
        if len(self.buckets) > self.prune_above:
            self.prune(now)
        return 0.0

    def prune(self, now: float) -> None:
        full = [k for k, (tokens, at) in self.buckets.items() if tokens + (now - at) * self.rate >= self.burst]
        for key in full:
            del self.buckets[key]
        self.prune_above = max(10_000, 2 * len(self.buckets))
