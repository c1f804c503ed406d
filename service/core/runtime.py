"""What every endpoint works with: the settings, the limits, the metrics, the engine, and where the
server is in its life (loading, ready, draining)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lstm_serve.core.access import Caller, KeyRing
from lstm_serve.core.engine import Engine
from lstm_serve.core.inputs import Limits
from lstm_serve.core.metrics import Metrics
from lstm_serve.core.offload import Decoder
from lstm_serve.errors import NotReady, RateLimited
from lstm_serve.settings import Settings
from lstm_serve.state.quotas import RateLimiter


@dataclass
class Runtime:
    settings: Settings
    limits: Limits
    metrics: Metrics
    engine: Engine
    keys: KeyRing = field(default_factory=lambda: KeyRing([]))  # none: the server is open
    admin_keys: KeyRing = field(default_factory=lambda: KeyRing([]))  # the repository API's; none: loopback only
    limiter: RateLimiter | None = None  # request rate per caller; None: no rate limit
    decoder: Decoder = field(default_factory=Decoder)  # large bodies are decoded off the event loop
    ready: bool = False  # every model loaded and warm
    draining: bool = False  # a SIGTERM arrived: still serving, but no longer to be routed to

    async def check_ready(self, with_store: bool = True) -> None:
        """Ready: models loaded and warm, not draining, and (with_store) the session store reachable."""
        if self.draining:
            raise NotReady("draining: the server is shutting down and finishes the requests it receives meanwhile")
        if not self.ready:
            raise NotReady("models are loading or the server is shutting down")
        if with_store and not await self.engine.store.ping():
            raise NotReady("the session store is unreachable")

    async def check_rate(self, caller: Caller) -> None:
        """Spend one of the caller's requests; RateLimited (429, with Retry-After) when none is left."""
        if self.limiter is None:
            return
        wait_s = await self.limiter.take(caller.quota_key)
        if wait_s > 0:
            raise RateLimited(
                f"over rate_limit={self.settings.rate_limit} for this API key (or client address); "
                f"retry in {wait_s:.2f} s",
                headers={"Retry-After": str(max(1, math.ceil(wait_s)))},
            )
