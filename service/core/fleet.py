"""The models a server serves, version by version: each loaded from the repository only after its sha256,
its contract and a warm-up pass; hot load and unload; retirement after a drain; and the version tables
(core/versions.py) that every replica sharing a directory (state/directory.py) follows.

A replica that learns of a version it has not loaded (another replica loaded it) loads it in the
background; meanwhile requests for it answer 503 `model_loading` with Retry-After, never another
version's result. A change is written to the shared tables before this replica acts on it: a write that
fails (Redis down, or another replica changed the table first) changes nothing here either.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import errno
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lstm_serve.core.batcher import Batcher
from lstm_serve.core.inputs import Catalogue, Limits
from lstm_serve.core.metrics import Metrics
from lstm_serve.core.repository import ModelEntry, RepositoryError, declared_sha256, load_entry, scan_repository
from lstm_serve.core.runner import Item, OnnxRunner, Output
from lstm_serve.core.versions import (
    Table,
    VersionPolicy,
    VersionState,
    plan_load,
    plan_unload,
    reuse_message,
    reused,
    serving,
    table_from_json,
    table_to_json,
)
from lstm_serve.errors import (
    LoadRefused,
    ModelLoading,
    ModelNotFound,
    ModelVersionRetired,
    ServiceError,
    StoreUnavailable,
)
from lstm_serve.settings import Settings
from lstm_serve.state.directory import ModelDirectory, TableChanged

log = logging.getLogger("lstm_serve")

# A batch of at most this many frames, padded (items x the longest), runs on the event loop, not in the
# worker thread (core/batcher.py): 50-350 us of onnxruntime on a CPU, about what the hand-off costs.
INLINE_FRAMES = 64
Key = tuple[str, int]  # (model name, version)
ATTEMPTS = 5  # a change planned again after another replica changed the table first, before giving up


def cheap(items: list[Item]) -> bool:
    return len(items) * max(len(item.frames) for item in items) <= INLINE_FRAMES


@dataclass(slots=True)
class Prediction:
    """The model's verdict after one frame."""

    label: str
    class_id: int
    probabilities: np.ndarray  # (C,) float32


@dataclass
class LoadedModel:
    entry: ModelEntry
    runner: OnnxRunner
    batcher: Batcher[Item, Output]

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def version(self) -> int:
        return self.entry.version

    def predict(self, probabilities: np.ndarray, class_id: int | None = None) -> Prediction:
        """The prediction for one frame's probabilities (C,) (class_id: their argmax, when known already), for a
        reply rendered at once: the row is not copied out of its batch's array."""
        if class_id is None:
            class_id = int(probabilities.argmax())
        return Prediction(self.entry.labels[class_id], class_id, probabilities)


def retired(name: str, version: int, state: VersionState, session: bool = False) -> ModelVersionRetired:
    what = f"this session runs on {name} v{version}, which" if session else f"{name} v{version}"
    replaced = f"; v{state.replaced_by} replaced it" if state.replaced_by is not None else "; no version replaced it"
    start = ": start a new session" if session and state.replaced_by is not None else ""
    return ModelVersionRetired(f"{what} was unloaded and its drain has ended{replaced}{start}")


def draining(name: str, version: int, state: VersionState, table: Table) -> ModelVersionRetired:
    newest = serving(table)  # not replaced_by: the version that replaced it may be unloaded since
    instead = f"; new sessions start on v{newest[-1]}" if newest else "; no version of it takes new sessions"
    until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(state.deadline or 0))
    return ModelVersionRetired(
        f"{name} v{version} is draining (unloaded): its live sessions continue until {until}, "
        f"but no new session starts on it{instead}"
    )


class Fleet:
    def __init__(self, settings: Settings, metrics: Metrics, directory: ModelDirectory, limits: Limits) -> None:
        self.settings, self.metrics, self.directory, self.limits = settings, metrics, directory, limits
        self.policy = VersionPolicy.parse(settings.version_policy)
        self.tables: dict[str, Table] = {}  # what every replica serves, from the directory
        self.loaded: dict[Key, LoadedModel] = {}  # what this replica has loaded
        self.models: dict[str, LoadedModel] = {}  # each model's default version, when loaded here
        self.on_disk: dict[str, dict[int, Path]] = {}
        self.refused: dict[Key, tuple[str, tuple[int, ...]]] = {}  # why a version did not load, and its files' mtimes
        self.loading: dict[Key, asyncio.Task[None]] = {}
        self.stopping: set[asyncio.Task[None]] = set()  # batchers of versions dropped outside a change
        self.generation = -1
        self.changes = asyncio.Lock()  # one load or unload at a time in this process
        self.default_model = settings.default_model
        self.catalogue = Catalogue(limits, {}, settings.default_model)

    # -- start and stop ------------------------------------------------------------------------
    async def start(self) -> None:
        """Load every model on disk, as the version policy and the shared tables say; a version that
        fails its checks stops the start (RepositoryError) rather than serving without it."""
        s = self.settings
        self.on_disk = scan_repository(s.model_repository, at_start=True)
        if not self.on_disk:
            raise RepositoryError(f"model repository {s.model_repository} holds no <name>/<version>/ entries")
        if self.default_model not in self.on_disk:
            if "default_model" in s.model_fields_set:  # asked for explicitly: a typo must not go unnoticed
                raise ModelNotFound(f"default model {s.default_model!r} is not in {s.model_repository}")
            self.default_model = next(iter(self.on_disk))
        async with self.changes:
            shared = await self.shared(self.sync)
            for name in self.on_disk:
                try:
                    if not (shared and await self.shared(lambda: self.apply(name, explicit=False))):  # noqa: B023
                        shared, self.generation = False, -1  # a sweep reads the tables again, and writes back theirs
                        self.tables[name] = self.plan(name, explicit=False)[1]  # if Redis lacks it
                    self.install(await self.prepare(name, self.tables[name]))  # what the tables serve, if apply did not
                except LoadRefused as error:
                    raise RepositoryError(error.message) from None
        self.publish()

    async def shared(self, work: Callable[[], Awaitable[object]]) -> bool:
        """At start, the shared tables are wanted, not required: with Redis unreachable the server starts on
        its own policy (sessions answer 503 meanwhile), and a sweep that reaches Redis publishes that."""
        try:
            await work()
        except StoreUnavailable as error:
            log.warning("model version tables not shared yet: %s", error.message)
            return False
        return True

    async def stop(self) -> None:
        for task in self.loading.values():
            task.cancel()
        await asyncio.gather(*(m.batcher.stop() for m in self.loaded.values()), *self.stopping)

    def serve(self, models: list[LoadedModel], default_model: str) -> None:
        """Serve these, already loaded and started, as the only version of each (tests use fakes)."""
        self.loaded = {(m.name, m.version): m for m in models}
        self.tables = {m.name: {m.version: VersionState("serving")} for m in models}
        self.default_model = default_model
        self.publish()

    # -- loading ---------------------------------------------------------------------------------
    def build(self, entry: ModelEntry) -> OnnxRunner:
        """An onnxruntime session that kept the graph's promises and ran once at each batch size it will
        see, so the first requests pay no set-up. In a worker thread: the event loop keeps serving."""
        runner = OnnxRunner(entry, self.settings.providers, self.settings.intra_op_threads)
        runner.check_contract()
        frames = np.zeros((3, entry.input_dim), np.float32)
        for batch_size in sorted({1, self.settings.max_batch_size}):
            runner.run([Item(frames, None)] * batch_size)
        return runner

    async def prepare(self, name: str, table: Table, built: dict[Key, OnnxRunner] | None = None) -> list[OnnxRunner]:
        """Runners for the live versions of `table` this replica has on disk but not loaded; LoadRefused
        naming the version and the reason if any fails (then none of them is used)."""
        now, versions = time.time(), self.on_disk.get(name, {})
        runners = []
        for version, state in sorted(table.items()):
            key = (name, version)
            if not state.live(now) or version not in versions or key in self.loaded or key in (built or {}):
                continue
            if key in self.loading:  # a background load has it
                continue
            if self.other_weights((name, version), state):
                continue  # the others serve this number with other weights: never here
            try:
                runners.append(await asyncio.to_thread(self.build, load_entry(versions[version])))
            except Exception as error:  # sha256, config, contract, onnxruntime, warm-up: all refuse the same way
                self.refused[name, version] = (str(error), signature(versions[version]))
                raise LoadRefused(f"{name} v{version} was not loaded: {error}") from None
            self.refused.pop((name, version), None)
        return runners

    def install(self, runners: list[OnnxRunner]) -> None:
        s = self.settings
        for runner in runners:
            entry = runner.entry
            if (entry.name, entry.version) in self.loaded:  # a background load got there first
                continue
            batcher: Batcher[Item, Output] = Batcher(
                runner.run,
                s.max_batch_size,
                s.max_queue_delay_ms / 1000,
                s.max_queue_length,
                observer=self.metrics.observer(entry.name),
                name=f"{entry.name}-v{entry.version}-batcher",
                cheap=cheap,
            )
            batcher.start()
            self.loaded[entry.name, entry.version] = LoadedModel(entry, runner, batcher)
            log.info("loaded %s v%d on %s", entry.name, entry.version, runner.provider)
            example = entry.example or {}
            if len(example.get("frames") or ()) > s.max_sequence_length:
                log.warning(
                    "%s v%d: its example has %d frames, over max_sequence_length=%d: a caller who tries it gets "
                    "422 (raise LSTM_SERVE_MAX_SEQUENCE_LENGTH, or export a shorter example)",
                    entry.name, entry.version, len(example["frames"]), s.max_sequence_length,
                )  # fmt: skip

    async def load(self, name: str, explicit: bool = True) -> Table:
        """Load a model from the repository as the version policy says (Triton's repository load): new
        versions start serving, versions the policy drops start draining. A version that fails its checks
        refuses the whole load (LoadRefused, 400); what served before serves on."""
        async with self.changes:
            await self.sync()
            try:
                self.on_disk = scan_repository(self.settings.model_repository)
            except RepositoryError as error:
                raise LoadRefused(str(error)) from None
            versions = self.on_disk.get(name)
            if not versions:
                raise LoadRefused(self.not_found(name))
            if explicit:
                await asyncio.to_thread(self.check_unchanged, name, versions)  # hashes each loaded model.onnx
            planned = await self.apply(name, explicit)
            self.publish()
            return planned

    def not_found(self, name: str) -> str:
        folder = self.settings.model_repository / name
        try:
            os.listdir(folder)
        except (NotADirectoryError, FileNotFoundError, ValueError):  # ValueError: a NUL in the name
            pass
        except OSError as error:  # unreadable, or a name too long for the file system
            if error.errno != errno.ENAMETOOLONG:
                return f"the model folder {folder} cannot be read ({error.strerror}): let the server's user read it"
        where = self.settings.model_repository
        return f"no model {name[:80]!r} in the repository {where} (it has {sorted(self.on_disk)})"

    async def apply(self, name: str, explicit: bool) -> Table:
        """Plan the model's table from what is on disk, build the runners it needs, write it to the shared
        tables, then serve it here. A table another replica changed first is read again and planned anew."""
        built: dict[Key, OnnxRunner] = {}  # kept across attempts: each is built and warmed up once
        for _ in range(ATTEMPTS):
            table, planned = self.plan(name, explicit)
            for runner in await self.prepare(name, planned, built):
                built[runner.entry.name, runner.entry.version] = runner
            if planned == table or await self.adopt(name, planned):  # the same: what it serves may not be here yet
                now = time.time()
                self.install([r for key, r in built.items() if key[1] in planned and planned[key[1]].live(now)])
                return planned
        raise busy(name)

    def check_unchanged(self, name: str, versions: dict[int, Path]) -> None:
        """A version's weights never change under its sessions: a load finding a loaded version's files
        changed (or broken) on disk is refused, so the operator hears of it now, not at the next start."""
        for version, path in versions.items():
            loaded = self.loaded.get((name, version))
            if loaded is None:
                continue
            try:
                on_disk = load_entry(path).config.get("sha256")
            except RepositoryError as error:
                raise LoadRefused(
                    f"{name} v{version} is loaded, but its files no longer load (restore them): {error}"
                ) from None
            if on_disk != loaded.entry.config.get("sha256"):
                raise LoadRefused(
                    f"{name} v{version} is loaded, and its model.onnx changed on disk since: a version's weights "
                    f"must not change under its sessions: restore v{version}'s files and write new weights as a new "
                    "version"
                )

    async def unload(self, name: str, version: int | None = None) -> Table:
        """Unload one version, or every serving version of a model: each drains (its sessions continue until
        version_drain_s has passed, then answer 410); new sessions go to the newest version left."""
        async with self.changes:
            await self.sync()
            for _ in range(ATTEMPTS):
                table = self.tables.get(name, {})
                live = serving(table)
                if not live or (version is not None and version not in live):
                    what = f"{name[:80]} v{version}" if version is not None else f"model {name[:80]!r}"
                    raise ModelNotFound(f"{what} is not serving here (serving versions: {live})")
                planned = plan_unload(table, version, self.settings.version_drain_s)
                if await self.adopt(name, planned):
                    self.publish()
                    return planned
            raise busy(name)

    def plan(self, name: str, explicit: bool) -> tuple[Table, Table]:
        """A model's table now, and after loading it from what is on disk; a poll (not explicit) leaves out
        the versions that failed before and have not changed since."""
        versions, table, drain_s = self.on_disk.get(name, {}), self.tables.get(name, {}), self.settings.version_drain_s
        available = {
            v: declared_sha256(path) for v, path in versions.items() if explicit or not self.refused_unchanged(name, v)
        }
        conflicts = reused(table, available)
        if conflicts:
            wanted = plan_load(table, available, self.policy, drain_s, explicit)
            for version, (served, on_disk) in conflicts.items():
                message = reuse_message(name, version, served, on_disk)
                self.refuse((name, version), message)
                if explicit and wanted[version].status == "serving":
                    raise LoadRefused(message)
                del available[version]
        return table, plan_load(table, available, self.policy, drain_s, explicit)

    def refuse(self, key: Key, reason: str, path: Path | None = None) -> None:
        """Remember why a version does not load here (until its files change), and log it once."""
        refusal = (reason, signature(path or self.on_disk[key[0]][key[1]]))
        if self.refused.get(key) != refusal:
            log.error("%s", reason)
        self.refused[key] = refusal

    def other_weights(self, key: Key, state: VersionState) -> bool:
        """This replica's files for a version differ from the weights the tables say it serves (refused)."""
        on_disk = declared_sha256(self.on_disk[key[0]][key[1]])
        if state.sha256 and on_disk != state.sha256:
            self.refuse(key, reuse_message(*key, state.sha256, on_disk or "none"))
            return True
        return False

    def refused_unchanged(self, name: str, version: int) -> bool:
        """A version that failed before, whose files have not changed since: polling does not retry it."""
        refused = self.refused.get((name, version))
        return refused is not None and refused[1] == signature(self.on_disk[name][version])

    async def poll(self) -> None:
        """Look for versions the policy would now serve (the repository poll); a version that fails is logged
        once and retried when its files change."""
        try:
            self.on_disk = scan_repository(self.settings.model_repository)
        except RepositoryError as error:
            log.error("repository poll: %s", error)
            return
        for name in self.on_disk:
            table, planned = self.plan(name, explicit=False)
            if planned == table:  # nothing new: no lock, no second scan, no round trip to the tables
                continue
            try:
                await self.load(name, explicit=False)
            except LoadRefused as error:
                log.error("repository poll: %s; the versions loaded before keep serving", error.message)

    # -- agreeing with the other replicas ---------------------------------------------------------
    async def sync(self, again: bool = False) -> None:
        """Read the shared tables if they changed since the last read (`again`: whatever the generation). A
        model this replica serves that they lack (Redis restarted empty, or was down at this start) is
        written back, so an unload or a drain is not forgotten."""
        generation = await self.directory.generation()
        if generation == self.generation and not again:
            return
        self.generation, shared = await self.directory.read()
        for name, document in shared.items():
            self.tables[name] = table_from_json(document)
        self.drop_other_weights()
        for name in [n for n in self.tables if n not in shared]:
            self.generation = -1  # read again next time: what others wrote since, or theirs if they wrote first
            with contextlib.suppress(TableChanged):
                await self.directory.write(name, table_to_json(self.tables[name]))
                log.warning("model version table of %s was missing from the shared tables: written back", name)

    def drop_other_weights(self) -> None:
        """A loaded version whose weights are not those the tables serve under its number (this replica
        loaded them while Redis was out of reach, or from a table from before sha256 was kept) stops serving
        here at once: its sessions' state belongs to the others' weights."""
        for key, model in list(self.loaded.items()):
            state = self.tables.get(key[0], {}).get(key[1])
            served = model.entry.config.get("sha256")
            if state is None or not state.sha256 or served == state.sha256:
                continue
            del self.loaded[key]
            stopping = asyncio.create_task(model.batcher.stop())
            self.stopping.add(stopping)
            stopping.add_done_callback(self.stopping.discard)
            self.refuse(key, reuse_message(*key, state.sha256, served or "none"), model.entry.path)

    async def adopt(self, name: str, table: Table) -> bool:
        """Write the model's new table to the shared tables, then take it here; False (nothing written, the
        tables read again) if another replica changed it first. A failed write (503) changes nothing here."""
        if self.tables.get(name) == table:
            return True
        try:
            await self.directory.write(name, table_to_json(table))
        except TableChanged:
            await self.sync(again=True)
            return False
        self.tables[name] = table
        return True

    async def refresh(self) -> None:
        """Every sweep: follow the shared tables (load in the background what others loaded), and free the
        versions whose drain has ended. Skipped while a load or unload is under way: it publishes itself."""
        if self.changes.locked():
            return
        async with self.changes:  # free: taken at once, so no change starts while the tables are read
            await self.sync()
            await self.retire_and_follow()
        self.publish()

    async def retire_and_follow(self) -> None:
        now = time.time()
        for name, table in list(self.tables.items()):
            for version, state in list(table.items()):
                key = (name, version)
                if state.retired_at(now) and key in self.loaded:
                    model = self.loaded.pop(key)
                    log.info("retired %s v%d: its drain ended", name, version)
                    await model.batcher.stop()
                elif state.live(now) and self.missing(key):
                    self.loading[key] = asyncio.create_task(self.load_in_background(key))

    def missing(self, key: Key) -> bool:
        """A version the tables serve, on this replica's disk (looked at each time: an operator may copy it
        in), neither loaded, loading, nor refused as it is."""
        name, version = key
        if key in self.loaded or key in self.loading:
            return False
        path = self.settings.model_repository / name / str(version)
        if not path.is_dir():
            return False
        self.on_disk.setdefault(name, {})[version] = path
        return not self.refused_unchanged(name, version)

    async def load_in_background(self, key: Key) -> None:
        name, version = key
        path = self.settings.model_repository / name / str(version)
        try:
            path = self.on_disk[name][version]
            state = self.tables[name][version]
            if self.other_weights(key, state):
                return
            runner = await asyncio.to_thread(self.build, load_entry(path))
        except Exception as error:
            self.refused[key] = (str(error), signature(path))
            log.error("%s v%d, loaded by another replica, does not load here: %s", name, version, error)
        else:
            self.install([runner])
        finally:
            self.loading.pop(key, None)
            self.publish()

    # -- what requests see -----------------------------------------------------------------------
    def publish(self) -> None:
        """Rebuild what requests are checked against: each model's default, every version taking work, and
        why the others take none."""
        now = time.time()
        entries: dict[Key, ModelEntry] = {}
        refusals: dict[tuple[str, int | None], ServiceError] = {}
        models: dict[str, LoadedModel] = {}
        for name, table in self.tables.items():
            for version, state in table.items():
                key = (name, version)
                if state.retired_at(now):
                    refusals[key] = retired(name, version, state)
                elif key in self.loaded:
                    entries[key] = self.loaded[key].entry
                else:
                    refusals[key] = self.unavailable(key)
            live = serving(table)
            if live and (name, max(live)) in self.loaded:
                models[name] = self.loaded[name, max(live)]
            elif live:
                refusals[name, None] = refusals[name, max(live)]
            else:
                refusals[name, None] = ModelVersionRetired(
                    f"model {name!r} was unloaded; POST /v2/repository/models/{name}/load serves it again"
                )
        self.models = models
        default_entries = {name: model.entry for name, model in models.items()}
        self.catalogue = Catalogue(self.limits, default_entries, self.default_model, entries, refusals)

    def unavailable(self, key: Key) -> ServiceError:
        name, version = key
        retry = {"Retry-After": "1"}
        if key in self.refused:  # a caller's answer: the server's paths stay in its log and the repository index
            reason = self.refused[key][0].replace(str(self.settings.model_repository), "<repository>")
            return ModelLoading(f"{name} v{version} does not load on this replica ({reason}); retry", retry)
        if version not in self.on_disk.get(name, {}):
            return ModelLoading(f"this replica's repository lacks {name} v{version}, which others serve; retry", retry)
        return ModelLoading(f"{name} v{version} is loading on this replica; retry shortly", retry)

    def model(self, name: str | None = None, version: int | None = None) -> LoadedModel:
        """The model for new work (classify, a new session): the named version, or the newest serving."""
        entry = self.catalogue.entry(name, version)
        state = self.tables.get(entry.name, {}).get(entry.version)
        if state is not None and state.status == "draining" and state.retired_at(time.time()):
            raise retired(entry.name, entry.version, state)  # its drain ended since the catalogue was built
        return self.loaded[entry.name, entry.version]

    def versions_of(self, name: str, new_sessions: bool) -> list[int]:
        """The versions of a model that take new work here: classify, or (new_sessions) new sessions too."""
        now, table = time.time(), self.tables.get(name, {})
        return sorted(
            v
            for v, state in table.items()
            if (name, v) in self.loaded and state.live(now) and (state.status == "serving" or not new_sessions)
        )

    def version_states(self, name: str) -> list[dict[str, object]]:
        """The versions of a model loaded here, serving or draining, as /v1/models lists them."""
        now, table = time.time(), self.tables.get(name, {})
        return [
            {"version": v, "status": s.status, "drain_deadline": s.deadline, "replaced_by": s.replaced_by}
            for v, s in sorted(table.items())
            if (name, v) in self.loaded and s.live(now)
        ]

    def check_new_session(self, model: LoadedModel) -> None:
        state = self.tables.get(model.name, {}).get(model.version)
        if state is not None and state.status != "serving":
            raise draining(model.name, model.version, state, self.tables[model.name])

    def session_model(self, name: str, version: int) -> LoadedModel:
        """The model a session runs on: its own version for its whole life, while that version lives."""
        model, state = self.loaded.get((name, version)), self.tables.get(name, {}).get(version)
        if state is None:
            if model is not None:
                return model
            raise ModelVersionRetired(f"this session runs on {name} v{version}, which no replica serves any more")
        if state.retired_at(time.time()):
            raise retired(name, version, state, session=True)
        if model is None:
            raise copy.copy(self.unavailable((name, version)))
        return model

    def index(self) -> list[dict[str, object]]:
        """Every version on disk or in the tables, with its state (Triton's repository index)."""
        now, rows = time.time(), []
        for name in sorted(set(self.on_disk) | set(self.tables)):
            table = self.tables.get(name, {})
            for version in sorted(set(self.on_disk.get(name, {})) | set(table)):
                state = self.describe((name, version), table.get(version), now)
                rows.append({"name": name, "version": str(version), **state})
        return rows

    def describe(self, key: Key, state: VersionState | None, now: float) -> dict[str, object]:
        if key in self.loading:
            return {"state": "LOADING", "reason": "loading on this replica"}
        if key in self.refused:
            return {"state": "UNAVAILABLE", "reason": self.refused[key][0]}
        if state is None:
            return {"state": "UNAVAILABLE", "reason": "not selected by the version policy"}
        if state.retired_at(now):
            return {"state": "UNAVAILABLE", "reason": retired(*key, state).message}
        if key not in self.loaded:
            return {"state": "UNAVAILABLE", "reason": self.unavailable(key).message}
        if state.status == "draining":
            return {"state": "UNLOADING", "reason": draining(*key, state, self.tables.get(key[0], {})).message}
        return {"state": "READY", "reason": ""}


def busy(name: str) -> StoreUnavailable:
    return StoreUnavailable(
        f"the version table of {name!r} kept changing under this change (other replicas loading or unloading "
        "it): retry",
        headers={"Retry-After": "1"},
    )


def signature(version_dir: Path) -> tuple[int, ...]:
    """When a version's files last changed: a refused version is tried again only once they do (0: missing
    or out of reach)."""
    return tuple(modified(version_dir / name) for name in ("config.json", "model.onnx"))


def modified(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0
