"""The artifact store: prepared tensors as safetensors files plus a JSON manifest. Never pickle.

A folder holds `quantized.safetensors` (packed weights), `residuals.safetensors` (the residual
tables that go to pinned host memory), `calibration.safetensors` (thresholds, channel means) and
`manifest.json`: the model's sha256, the config that made them, every tensor's shape, and each
file's sha256. Files are written to a temporary name and renamed, the manifest last, so an
interrupted `prepare` leaves nothing that a later run trusts.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from decdec.errors import ArtifactError

FORMAT_VERSION = 1
FILES = ("quantized", "residuals", "calibration")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_artifacts(folder: Path, key: dict, tensors: dict[str, dict[str, torch.Tensor]], info: dict) -> None:
    """Write the three tensor files, then the manifest. `key` identifies model + config."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"format_version": FORMAT_VERSION, "key": key, "info": info, "files": {}}
    for name in FILES:
        path = folder / f"{name}.safetensors"
        part = {k: v.contiguous() for k, v in tensors[name].items()}
        _atomic_write(path, lambda tmp: save_file(part, str(tmp)))
        manifest["files"][name] = {
            "sha256": _sha256(path),
            "shapes": {k: list(v.shape) for k, v in part.items()},
        }
    _atomic_write(folder / "manifest.json", lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))


def read_manifest(folder: Path) -> dict | None:
    """The manifest, or None when the folder holds no finished artifacts."""
    path = folder / "manifest.json"
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is corrupt (not JSON: {e}); delete the folder or prepare with --force") from e
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format version {manifest.get('format_version')}, expected {FORMAT_VERSION}")
    return manifest


def check_key(folder: Path, manifest: dict, key: dict) -> None:
    """Refuse artifacts made from another model or config, naming what differs."""
    theirs = manifest["key"]
    for field in sorted(set(key) | set(theirs)):
        if theirs.get(field) != key.get(field):
            raise ArtifactError(
                f"artifacts in {folder} were made with {field} = {theirs.get(field)!r}, "
                f"but this run has {field} = {key.get(field)!r}: use another artifacts folder, "
                "or prepare again with --force to overwrite"
            )


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
        if _sha256(path) != entry["sha256"]:
            raise ArtifactError(f"{path} is corrupt (sha256 differs from the manifest); prepare again with --force")
        try:
            tensors[name] = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise ArtifactError(f"{path} is unreadable ({e}); prepare again with --force") from e
        shapes = {k: list(v.shape) for k, v in tensors[name].items()}
        if shapes != entry["shapes"]:
            raise ArtifactError(f"{path}: tensor shapes differ from the manifest; prepare again with --force")
    return tensors, manifest["info"]
