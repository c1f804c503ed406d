"""What this process holds of request bodies and WebSocket messages that are still arriving.

max_body_bytes bounds one body, max_connections the connections, but not their product: 10 clients that
each sent 8 MiB of a body (or of a fragmented WebSocket message) and then stalled held 80 MB until
body_timeout_s, and at the defaults a few hundred could hold gigabytes. Past `max_buffered_bytes` in all, a
request's next chunk is refused (503 `overloaded`, the connection closed: the rest of its body is never read)
and a WebSocket whose message grows is closed (1013, try again later). The first FREE_BYTES of each body or
message are not counted, so small requests, the everyday ones, are never refused for what others hold.
"""

from __future__ import annotations

FREE_BYTES = 64 * 1024


class Buffers:
    """The bytes held past each body's or message's first FREE_BYTES, over every connection of this process
    (one event loop: a plain number)."""

    __slots__ = ("limit", "held")

    def __init__(self, limit: int = 256 * 1024 * 1024) -> None:
        self.limit, self.held = limit, 0

    def take(self, size: int) -> bool:
        """Count `size` more bytes held, unless that passes the limit (then nothing is counted)."""
        if self.held + size > self.limit:
            return False
        self.held += size
        return True

    def give(self, size: int) -> None:
        self.held -= size


buffers = Buffers()  # the limit is set by create_app (max_buffered_bytes)


class Holding:
    """One body's, message's or connection's count: `hold` as it grows and shrinks, `release` once done."""

    __slots__ = ("counted",)

    def __init__(self) -> None:
        self.counted = 0

    def hold(self, size: int) -> bool:
        """It holds `size` bytes now; False (and the count unchanged) if counting them would pass the limit."""
        wanted = max(0, size - FREE_BYTES) - self.counted
        if wanted > 0 and not buffers.take(wanted):
            return False
        if wanted < 0:
            buffers.give(-wanted)
        self.counted += wanted
        return True

    def release(self) -> None:
        buffers.give(self.counted)
        self.counted = 0
