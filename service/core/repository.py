"""The model repository on disk: <root>/<name>/<version>/{model.onnx, config.json}."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("lstm_serve")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    version: int
    path: Path  # the version folder
    config: dict

    @property
    def onnx_path(self) -> Path:
        return self.path / "model.onnx"

    @property
    def labels(self) -> list[str]:
        return self.config["labels"]

    @property
    def input_dim(self) -> int:
        return self.config["input_dim"]

    @property
    def frames_input(self) -> str:
        return self.config["inputs"][0]["name"]

    @property
    def lengths_input(self) -> str | None:
        """The graph's per-row lengths input, when it has one (rows of different lengths share a call)."""
        return self.config.get("lengths_input")

    @property
    def description(self) -> str:
        return self.config.get("description", "")

    @property
    def feature_names(self) -> list[str]:
        """What each of the input_dim numbers of a frame is (f0, f1, ... when the model does not say)."""
        return self.config.get("feature_names") or [f"f{k}" for k in range(self.input_dim)]

    @property
    def example(self) -> dict | None:
        """{"label": ..., "frames": [[...], ...]}: a real sequence of the data, to try the model with."""
        return self.config.get("example")

    @property
    def state_specs(self) -> list[dict]:
        """[{"input": "h0", "output": "hn", "shape": [L, H]}, ...]: what a session carries."""
        return self.config["state"]


class RepositoryError(RuntimeError):
    pass


def read_config(config_path: Path) -> dict:
    try:
        config = json.loads(config_path.read_bytes())
    except (ValueError, OSError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RepositoryError(f"{config_path} is not readable JSON ({error})") from None
    if not isinstance(config, dict):
        raise RepositoryError(f"{config_path} holds a JSON {type(config).__name__}, not an object")
    return config


def is_names(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def check_contents(config_path: Path, config: dict) -> None:
    """What the server builds on: a config.json written by hand or by another tool is refused for what it
    gets wrong, naming the field, instead of failing later in a request."""

    def refuse(what: str) -> None:
        raise RepositoryError(f"{config_path}: {what}")

    if not isinstance(config["name"], str) or not config["name"]:
        refuse("name must be a non-empty string")
    labels, width = config["labels"], config["input_dim"]
    if not is_names(labels) or not labels or len(set(labels)) != len(labels):
        refuse("labels must be a list of distinct strings")
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        refuse(f"input_dim must be a whole number of at least 1, not {str(width)[:20]!r}")
    names = config.get("feature_names")
    if names and (not is_names(names) or len(names) != width):  # [] or none: f0, f1, ... (ModelEntry)
        refuse(f"feature_names must be input_dim={width} strings")
    inputs = config["inputs"]
    if not isinstance(inputs, list) or not inputs or not isinstance(inputs[0], dict) or "name" not in inputs[0]:
        refuse("inputs must list the graph's inputs, the frames first")
    if inputs[0].get("datatype", "FP32") != "FP32":
        refuse(f"the frames input must be FP32, not {str(inputs[0].get('datatype'))[:20]!r}")
    state = config["state"]
    well_formed = isinstance(state, list) and all(
        isinstance(s, dict) and {"input", "output", "shape"} <= s.keys() and isinstance(s["shape"], list) for s in state
    )
    if not well_formed:
        refuse("state must list {input, output, shape} per state tensor")
    example = config.get("example")
    if example is not None:
        frames = example.get("frames") if isinstance(example, dict) else None
        if not isinstance(example, dict) or str(example.get("label")) not in labels:
            refuse("example.label must be one of the labels")
        if (
            not isinstance(frames, list)
            or not frames
            or any(not isinstance(f, list) or len(f) != width for f in frames)
        ):
            refuse(f"example.frames must be frames of input_dim={width} numbers")


def load_entry(version_dir: Path) -> ModelEntry:
    config_path, onnx_path = version_dir / "config.json", version_dir / "model.onnx"
    if not config_path.is_file() or not onnx_path.is_file():
        raise RepositoryError(f"{version_dir} needs both model.onnx and config.json")
    config = read_config(config_path)
    try:
        digest = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    except OSError as error:
        raise RepositoryError(f"{onnx_path} cannot be read ({error.strerror})") from None
    if digest != config.get("sha256"):
        raise RepositoryError(f"{onnx_path} does not match the sha256 in its config.json (file changed or corrupt)")
    for key in ("name", "version", "labels", "input_dim", "state", "inputs", "outputs"):
        if key not in config:
            raise RepositoryError(f"{config_path} lacks {key!r}")
    check_contents(config_path, config)
    if is_version(version_dir.name) and config["name"] != version_dir.parent.name:
        raise RepositoryError(
            f"{config_path} names the model {config['name']!r}, but its folder is {version_dir.parent.name!r}"
        )
    if is_version(version_dir.name) and str(config["version"]) != str(int(version_dir.name)):
        raise RepositoryError(f"{config_path} says version {config['version']}, but its folder is {version_dir.name}")
    version = version_number(str(config["version"]))
    if version is None:
        said = str(config["version"])[:40]
        raise RepositoryError(f"{config_path}: version {said!r} is not a version (1 or more, up to 18 digits)")
    return ModelEntry(name=config["name"], version=version, path=version_dir, config=config)


def declared_sha256(version_dir: Path) -> str | None:
    """The sha256 a version's config.json vouches for (load_entry checks model.onnx against it), or None when
    the config does not read."""
    try:
        config = json.loads((version_dir / "config.json").read_bytes())
    except (OSError, ValueError):
        return None
    digest = config.get("sha256") if isinstance(config, dict) else None
    return digest if isinstance(digest, str) else None


MAX_VERSION_DIGITS = 18  # a version fits a signed 64-bit integer, which JSON writers and clients take


def is_number(name: str) -> bool:
    """ASCII digits only (str.isdigit() also takes '²', which int() refuses)."""
    return name.isascii() and name.isdigit()


def is_version(name: str) -> bool:
    """A version folder's name: a number from 1, of up to 18 digits (requests name versions from 1, as Triton)."""
    return is_number(name) and len(name) <= MAX_VERSION_DIGITS and int(name) > 0


def version_number(text: str) -> int | None:
    """A version as a request names it (a path segment, a parameter), or None if it is not one."""
    return int(text) if is_version(text) else None


@functools.cache
def warn_not_a_version(folder: Path) -> None:
    """Once per folder, not at every poll of the repository."""
    if int(folder.name) == 0:
        log.warning("skipping %s: versions start at 1 (rename it to serve it)", folder)
    else:
        log.warning("skipping %s: a version number has at most %d digits", folder, MAX_VERSION_DIGITS)


@functools.cache
def warn_unreadable(folder: Path, reason: str) -> None:
    """Once per folder and reason, not at every poll of the repository."""
    log.error("skipping %s: it cannot be read (%s)", folder, reason)


def scan_repository(root: Path, at_start: bool = False) -> dict[str, dict[int, Path]]:
    """Every <name>/<version>/ folder under root, by name then version; nothing is read or checked yet. A
    model folder the server cannot read stops a start (RepositoryError); later it is skipped, logged once."""
    if not root.is_dir():
        raise RepositoryError(f"model repository {root} does not exist")
    found: dict[str, dict[int, Path]] = {}
    try:
        model_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError as error:  # not readable by the server's user
        raise RepositoryError(f"model repository {root} cannot be read ({error.strerror})") from None
    for model_dir in model_dirs:
        try:
            folders = [p for p in model_dir.iterdir() if p.is_dir()]
        except OSError as error:
            if at_start:
                raise RepositoryError(f"model folder {model_dir} cannot be read ({error.strerror})") from None
            warn_unreadable(model_dir, error.strerror or str(error))
            continue
        for skipped in (p for p in folders if is_number(p.name) and not is_version(p.name)):
            warn_not_a_version(skipped)
        versions = {int(p.name): p for p in folders if is_version(p.name)}
        if versions:
            found[model_dir.name] = dict(sorted(versions.items()))
    return found


def load_repository(root: Path) -> dict[str, ModelEntry]:
    """The newest version of every model under root, by name."""
    entries = {name: load_entry(versions[max(versions)]) for name, versions in scan_repository(root, True).items()}
    if not entries:
        raise RepositoryError(f"model repository {root} holds no <name>/<version>/ entries")
    return entries
