"""Where replicas agree on which model versions are loaded: each model's version table (core/versions.py),
as JSON, with a generation number that moves on every change, so a replica polls one integer to learn
that it has to read the tables again.

One process alone keeps them here; replicas sharing Redis keep them in the hash `lstm-serve:models`
(state/redis.py: RedisDirectory). A write is a compare-and-set against the table this replica last read or
wrote: a replica that planned from a table another has changed since learns so (TableChanged), reads the
tables again and plans anew, so no replica's change overwrites another's.
"""

from __future__ import annotations

from typing import Any, Protocol


class TableChanged(Exception):
    """Another replica changed the model's table since this one last read it: nothing was written."""


class ModelDirectory(Protocol):
    async def generation(self) -> int: ...

    async def read(self) -> tuple[int, dict[str, dict[str, Any]]]:
        """(generation, {model name: its version table as JSON})."""
        ...

    async def write(self, name: str, table: dict[str, Any]) -> int:
        """Store one model's table if it is still the one last read or written here (else TableChanged; a
        model absent then must be absent still); the new generation."""
        ...


class LocalDirectory:
    def __init__(self) -> None:
        self.tables: dict[str, dict[str, Any]] = {}
        self.count = 0

    async def generation(self) -> int:
        return self.count

    async def read(self) -> tuple[int, dict[str, dict[str, Any]]]:
        return self.count, dict(self.tables)

    async def write(self, name: str, table: dict[str, Any]) -> int:
        self.tables[name] = table
        self.count += 1
        return self.count
