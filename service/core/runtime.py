"""What every endpoint works with: the settings, the limits, the metrics, the engine, and where the
server is in its life (loading, ready, draining)."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from lstm_serve.core.access import Caller, KeyRing
from lstm_serve.core.engine import Engine
from lstm_serve.core.inputs import Limits
from lstm_serve.core.metrics import Metrics
from lstm_serve.core.offload import Decoder
from lstm_serve.errors import NotReady, RateLimited, ServiceError
from lstm_serve.settings import Settings
from lstm_serve.state.quotas import RateLimiter

T = TypeVar("T")
PROBE_WAIT_S = 0.5  # how long readiness and a metrics scrape wait on the session store (a stalled Redis: 2 s)


class Shared(Generic[T]):
    """One call at a time to a dependency that may stall, for callers that must answer within `wait_s` whatever
    it does (a readiness probe, a metrics scrape): callers asking while a call runs share it, and one that
    outlasts the wait runs on in the background, so the next caller finds it in flight instead of adding one."""

    def __init__(self, call: Callable[[], Awaitable[T]], wait_s: float) -> None:
        self.call, self.wait_s = call, wait_s
        self.task: asyncio.Future[T] | None = None

    async def get(self) -> T:
        """The call's answer or its exception; TimeoutError when it has not answered within wait_s."""
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self.call())
            self.task.add_done_callback(retrieved)
        return await asyncio.wait_for(asyncio.shield(self.task), self.wait_s)


def retrieved(task: asyncio.Future) -> None:
    """Whether a late call failed no caller is waiting to hear: read it, so asyncio does not log it as lost."""
    if not task.cancelled():
        task.exception()


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
    store_reachable: Shared[bool] = field(init=False)
    session_count: Shared[int] = field(init=False)

    def __post_init__(self) -> None:
        self.store_reachable = Shared(self.engine.store.ping, PROBE_WAIT_S)
        self.session_count = Shared(self.engine.store.count, PROBE_WAIT_S)

    async def check_ready(self, with_store: bool = True) -> None:
        """Ready: models loaded and warm, not draining, and (with_store) the session store reachable."""
        if self.draining:
            raise NotReady("draining: the server is shutting down and finishes the requests it receives meanwhile")
        if not self.ready:
            raise NotReady("models are loading or the server is shutting down")
        if not with_store:
            return
        try:
            reachable = await self.store_reachable.get()
        except TimeoutError:
            raise NotReady(f"the session store did not answer within {PROBE_WAIT_S:g} s") from None
        if not reachable:
            raise NotReady("the session store is unreachable")

    async def active_sessions(self) -> int | None:
        """Live sessions in the store; None when it is down or did not answer within PROBE_WAIT_S."""
        with contextlib.suppress(ServiceError, TimeoutError):
            return await self.session_count.get()
        return None

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
