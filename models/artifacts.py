"""The artifact store: prepared tensors as safetensors files plus a JSON manifest. Never pickle.

A folder holds `quantized.safetensors` (packed weights), `residuals.safetensors` (the residual
tables that go to pinned host memory), `calibration.safetensors` (thresholds, channel means) and
`manifest.json`: the model's sha256, the config that made them, every tensor's shape, and each
file's sha256. A rebuild first removes the old manifest; files are written to a temporary name and
renamed, the manifest last, so an interrupted `prepare` leaves nothing that a later run trusts.
`locked` serialises prepares of one folder across processes (a `fcntl.flock` on a lock file beside it).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from decdec.errors import ArtifactError

FORMAT_VERSION = 1
FILES = ("quantized", "residuals", "calibration")


def file_sha256(paths: list[Path]) -> str:
    """One sha256 over the bytes of all `paths`, in sorted order (a model's files, one artifact file)."""
    h = hashlib.sha256()
    for path in sorted(paths):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


class StoredTensors:
    """A dataclass whose tensor fields `TENSOR_NAMES` are stored as `{prefix}.{name}` in one of the
    safetensors files (its other fields go in the manifest, and back through `from_tensors`)."""

    TENSOR_NAMES: ClassVar[tuple[str, ...]]
    WHAT: ClassVar[str]  # how an error names it: "quantized weights", ...

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{name}": getattr(self, name).contiguous() for name in self.TENSOR_NAMES}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str, **fields):
        """Inverse of `to_tensors`, with the other `fields`; ArtifactError on a missing or ill-shaped tensor."""
        missing = [f"{prefix}.{n}" for n in cls.TENSOR_NAMES if f"{prefix}.{n}" not in tensors]
        if missing:
            raise ArtifactError(f"{cls.WHAT}: missing tensor(s) {missing}")
        try:
            return cls(**{n: tensors[f"{prefix}.{n}"] for n in cls.TENSOR_NAMES}, **fields)
        except ValueError as err:
            raise ArtifactError(f"{cls.WHAT} '{prefix}': {err}") from err


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:  # interrupted: no temporary file is left behind
        tmp.unlink(missing_ok=True)


@contextmanager
def locked(folder: Path, on_wait: Callable[[], None] | None = None):
    """Hold an exclusive lock on `folder` while the block runs; another process asking for the same
    folder waits (after calling `on_wait`). The lock file stays: removing it would race a waiter."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait:
                on_wait()
            fcntl.flock(f, fcntl.LOCK_EX)
        yield  # closing the file releases the lock, also when the process dies


def save_artifacts(folder: Path, key: dict, tensors: dict[str, dict[str, torch.Tensor]], info: dict) -> None:
    """Write the three tensor files, then the manifest. `key` identifies model + config."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").unlink(missing_ok=True)  # old artifacts stop being trusted before any file changes
    manifest = {"format_version": FORMAT_VERSION, "key": key, "info": info, "files": {}}
    for name in FILES:
        path = folder / f"{name}.safetensors"
        part = {k: v.contiguous() for k, v in tensors[name].items()}
        _atomic_write(path, lambda tmp: save_file(part, str(tmp)))
        manifest["files"][name] = {"sha256": file_sha256([path]), "shapes": {k: list(v.shape) for k, v in part.items()}}
    _atomic_write(folder / "manifest.json", lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))


def read_manifest(folder: Path) -> dict | None:
    """The manifest, or None when the folder holds no finished artifacts."""
    path = folder / "manifest.json"
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is corrupt (not JSON: {e}); delete the folder or prepare with --force") from e
    _check_schema(path, manifest)
    return manifest


def _check_schema(path: Path, manifest) -> None:
    """ArtifactError naming the first field that save_artifacts would not have written."""
    def bad(problem: str) -> ArtifactError:
        return ArtifactError(f"{path} is not a DecDEC manifest ({problem}); delete the folder or prepare with --force")

    if not isinstance(manifest, dict):
        raise bad(f"a JSON {type(manifest).__name__}, expected an object")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format version {manifest.get('format_version')}, expected {FORMAT_VERSION}")
    for field in ("key", "info", "files"):
        if not isinstance(manifest.get(field), dict):
            raise bad(f"field '{field}' is missing or not an object")
    bits = manifest["info"].get("layer_bits")
    if not isinstance(bits, list) or not all(b in (3, 4) for b in bits):
        raise bad("field 'info.layer_bits' is missing or not a list of 3 and 4")
    for name in FILES:
        entry = manifest["files"].get(name)
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                and isinstance(entry.get("shapes"), dict)):
            raise bad(f"field 'files.{name}' needs 'sha256' and 'shapes'")


def check_key(folder: Path, manifest: dict, key: dict) -> None:
    """Refuse artifacts made from another model or config, naming what differs."""
    theirs = manifest["key"]
    for field in sorted(set(key) | set(theirs)):
        if theirs.get(field) != key.get(field):
            raise ArtifactError(f"artifacts in {folder} were made with {field} = {theirs.get(field)!r}, but this run "
                                f"has {field} = {key.get(field)!r}: use another artifacts folder, "
                                "or prepare again with --force to overwrite")


def load_artifacts(folder: Path, key: dict) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Verified tensors (hashes and shapes) and the manifest's info."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise ArtifactError(f"no prepared artifacts in {folder}: run `decdec prepare` first")
    check_key(folder, manifest, key)
    tensors = {}
    for name in FILES:
        path = folder / f"{name}.safetensors"
        entry = manifest["files"][name]
        if not path.exists():
            raise ArtifactError(f"{path} is missing; prepare again with --force")
        if file_sha256([path]) != entry["sha256"]:
            raise ArtifactError(f"{path} is corrupt (sha256 differs from the manifest); prepare again with --force")
        try:
            tensors[name] = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise ArtifactError(f"{path} is unreadable ({e}); prepare again with --force") from e
        shapes = {k: list(v.shape) for k, v in tensors[name].items()}
        if shapes != entry["shapes"]:
            raise ArtifactError(f"{path}: tensor shapes differ from the manifest; prepare again with --force")
    return tensors, manifest["info"]
