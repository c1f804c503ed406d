"""Which versions of a model serve, and what becomes of the others: the version policy and the table of
versions every replica follows.

A model's table maps each version it has served to a state:

    serving    new work (classify, new sessions) may name it; the newest serving version is the default
    draining   unloaded while sessions may live on it: its sessions continue until `deadline`, classify may
               still name it, but no new session starts on it; past `deadline` it is retired: its sessions
               answer 410 `model_version_retired`, naming `replaced_by` (each replica reads that from the
               clock, so nobody has to write it)

A session's h and c mean something only under the weights that made them, so a session stays on its
version for its whole life; only new sessions move to the newest. The table is plain JSON so that
replicas can share it through Redis (state/directory.py) and agree on what is loaded. Each version keeps
the sha256 of the weights it was first served with, for good: a replica whose files for that number
differ does not load them, and a number once served never comes back with other weights.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from lstm_serve.settings import parse_version_policy

Status = Literal["serving", "draining"]


@dataclass(frozen=True)
class VersionPolicy:
    """`latest` (the newest version only), `latest:N` (the newest N) or `all`."""

    newest: int | None  # None: all

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        return cls(parse_version_policy(text))

    def select(self, versions: set[int]) -> set[int]:
        ordered = sorted(versions)
        return set(ordered if self.newest is None else ordered[-self.newest :])


@dataclass(frozen=True)
class VersionState:
    status: Status
    deadline: float | None = None  # draining: when its sessions stop being served (unix seconds)
    replaced_by: int | None = None  # draining: the version new sessions get instead
    sha256: str | None = None  # of the weights served under this number (None: a table from before it was kept)

    def retired_at(self, now: float) -> bool:
        """Draining past its deadline."""
        return self.status == "draining" and self.deadline is not None and now >= self.deadline

    def live(self, now: float) -> bool:
        """Its sessions are served: serving, or draining before its deadline."""
        return not self.retired_at(now)


Table = dict[int, VersionState]  # one model's versions


def serving(table: Table) -> list[int]:
    return sorted(v for v, state in table.items() if state.status == "serving")


def reused(table: Table, available: Mapping[int, str | None]) -> dict[int, tuple[str, str]]:
    """The versions on disk whose weights differ from those the table says were served under their number:
    {version: (sha256 served, sha256 on disk)}."""
    found = {}
    for version, digest in available.items():
        served = table[version].sha256 if version in table else None
        if served and digest and served != digest:
            found[version] = (served, digest)
    return found


def reuse_message(name: str, version: int, served: str, on_disk: str) -> str:
    return (
        f"{name} v{version} on this replica's disk has other weights (sha256 {on_disk[:12]}...) than the v{version} "
        f"served before (sha256 {served[:12]}...): a version number never changes its weights, since its sessions' "
        f"state belongs to them: export the new weights as a new version, or restore v{version}'s files"
    )


def plan_load(
    table: Table,
    available: Mapping[int, str | None],
    policy: VersionPolicy,
    drain_s: float,
    explicit: bool,
    now: float | None = None,
) -> Table:
    """The table after loading a model from the repository, where `available` are the versions on disk (each
    with the sha256 its config.json declares; those `reused` must be left out before).

    The policy picks among the versions on disk and those already serving (another replica may serve one
    this one lacks: it is never downgraded). A version unloaded on purpose (draining, or retired) comes back
    only with an explicit load. Serving versions the policy no longer keeps start draining."""
    now = time.time() if now is None else now
    unloaded = {v for v, state in table.items() if state.status != "serving"}
    candidates = (set(available) if explicit else set(available) - unloaded) | set(serving(table))
    keep = policy.select(candidates)
    planned = dict(table)
    for version in keep:
        # a version in the table keeps its sha256, or its lack of one (served by an earlier release): this
        # replica cannot vouch for the weights others served
        known = table.get(version)
        digest = known.sha256 if known is not None else available.get(version)
        planned[version] = VersionState("serving", sha256=digest)
    newest = max(keep) if keep else None
    for version in serving(table):
        if version not in keep:
            planned[version] = replace(table[version], status="draining", deadline=now + drain_s, replaced_by=newest)
    return planned


def plan_unload(table: Table, version: int | None, drain_s: float, now: float | None = None) -> Table:
    """The table after unloading one version (or every serving version): each starts draining; new
    sessions go to the newest version left serving, if any."""
    now = time.time() if now is None else now
    targets = set(serving(table)) if version is None else {version}
    remaining = [v for v in serving(table) if v not in targets]
    newest = max(remaining) if remaining else None
    planned = dict(table)
    for target in targets:
        planned[target] = replace(table[target], status="draining", deadline=now + drain_s, replaced_by=newest)
    return planned


def table_to_json(table: Table) -> dict[str, Any]:
    return {str(version): asdict(state) for version, state in sorted(table.items())}


def table_from_json(document: dict[str, Any]) -> Table:
    """A table as written by this release or another: fields this one does not know are left out."""
    return {
        int(version): VersionState(**{k: v for k, v in state.items() if k in STATE_FIELDS})
        for version, state in document.items()
    }


STATE_FIELDS = frozenset(VersionState.__dataclass_fields__)
