"""Chunk manifests: what a finished Zarr store holds, so a missing or damaged chunk is found.

- `chunk_manifest(path)`: the manifest written once when a store (a count store or a run output:
  components, generality, ablation, comparison) is finished: per array its shape and chunk shape
  and, for every key of its chunk grid, the chunk file's size and CRC-32, or null where the chunk
  was not written (zarr's fill value); and the root attributes that decide results.
- `read_manifest(path)`: the store's manifest (one of format 1, as stores before format 2 wrote
  them, converted in memory: its arrays' grids and root attributes taken from the store); a
  missing or unreadable one is a ManifestError.
- `find_damage(path, manifest, full)`: the chunks that are missing (also from the manifest:
  the whole chunk grid is checked), resized or (with `full`) whose bytes changed, per array, and
  the root attributes that changed. Without `full` only file sizes are read (a stat per chunk).
- `chunk_files(path, name)`: an array's chunk files present on disk, by chunk key.
- `expected_chunks(path, name)`: every chunk key an array's chunk grid has.
- `STATUS_ATTRS`: root attributes written after the manifest (a store's status), not covered.

Every other root attribute is covered: for a count store `extraction_key`, `counts_key`,
`model`, `model_fingerprint`, `dataset_hash`, `dataset_path`, `token_span`, `shard_size`, the
layer and dtype attributes; for a run output its provenance and settings (`rule`, `epsilon`,
`group_by`, `store_path`, `store_extraction_key`, ...).

Zarr reads an absent chunk as the fill value without a word, which would turn a deleted count
chunk into zeros; comparing against the manifest is what tells "absent" from "all zero".
A full check remembers the files' sizes and write times per process, so a store opened by
several readers in one process is read once.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST_NAME = "sparcom_manifest.json"
FORMAT = 2
SKIPPED = ("progress",)  # resume bookkeeping of a store being written, not data
STATUS_ATTRS = ("sparcom_status",)
_verified: dict[str, tuple] = {}


class ManifestError(ValueError):
    """The store's manifest is missing or cannot be read."""


@dataclass
class Damage:
    """Per array, chunk keys (such as 'c/3/0/0') that are missing or changed; changed root
    attributes and arrays whose chunk grid changed."""
    missing: dict[str, list[str]] = field(default_factory=dict)
    changed: dict[str, list[str]] = field(default_factory=dict)
    attrs: list[str] = field(default_factory=list)
    grids: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.missing or self.changed or self.attrs or self.grids)

    def arrays(self) -> dict[str, list[str]]:
        merged: dict[str, list[str]] = {}
        for part in (self.missing, self.changed):
            for name, keys in part.items():
                merged.setdefault(name, []).extend(keys)
        return merged


def _read_json(file: Path) -> dict:
    try:
        return json.loads(Path(file).read_text(encoding="utf-8"))
    except ValueError as error:
        raise ManifestError(f"{file}: unreadable ({error})") from None


def _arrays(path: Path) -> list[str]:
    """Names of the store's arrays (folders holding a zarr.json of node_type array)."""
    names = []
    for meta in sorted(Path(path).rglob("zarr.json")):
        folder = meta.parent.relative_to(path)
        if folder == Path(".") or folder.parts[0] in SKIPPED:
            continue
        if _read_json(meta).get("node_type") == "array":
            names.append(folder.as_posix())
    return names


def root_attrs(path: Path) -> dict:
    """The root attributes a manifest covers."""
    attributes = _read_json(Path(path) / "zarr.json").get("attributes", {})
    return {key: value for key, value in attributes.items() if key not in STATUS_ATTRS}


def chunk_files(path: Path, name: str) -> dict[str, os.stat_result]:
    root = Path(path) / name / "c"
    if not root.is_dir():
        return {}
    return {file.relative_to(Path(path) / name).as_posix(): file.stat()
            for file in root.rglob("*") if file.is_file()}


def _crc(file: Path) -> int:
    crc = 0
    with open(file, "rb") as handle:
        while block := handle.read(1 << 24):
            crc = zlib.crc32(block, crc)
    return crc


def _grid(path: Path, name: str) -> dict:
    meta = _read_json(Path(path) / name / "zarr.json")
    return {"shape": meta["shape"], "chunks": meta["chunk_grid"]["configuration"]["chunk_shape"]}


def chunk_manifest(path: Path) -> dict:
    path = Path(path)
    arrays = {}
    for name in _arrays(path):
        present = chunk_files(path, name)
        arrays[name] = {**_grid(path, name), "files": {
            key: [present[key].st_size, _crc(path / name / key)] if key in present else None
            for key in expected_chunks(path, name)}}
    return {"format": FORMAT, "arrays": arrays, "attrs": root_attrs(path)}


def expected_chunks(path: Path, name: str) -> list[str]:
    grid = _grid(path, name)
    ranges = [range(math.ceil(s / c)) for s, c in zip(grid["shape"], grid["chunks"])]
    return ["c/" + "/".join(map(str, index)) for index in itertools.product(*ranges)]


def read_manifest(path: Path) -> dict:
    """Format 1 listed the chunk files alone: its grids and attributes are the store's own now,
    and a grid key it does not list is missing (format 1 stores wrote every chunk)."""
    file = Path(path) / MANIFEST_NAME
    if not file.is_file():
        raise ManifestError(f"{path}: no chunk manifest ({MANIFEST_NAME})")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ManifestError(f"{file}: unreadable chunk manifest ({error})") from None
    try:
        if manifest.get("format") == 1:
            return {"format": 1, "attrs": root_attrs(path), "arrays": {
                name: {**_grid(path, name), "files": listed} for name, listed in manifest["arrays"].items()}}
        if manifest.get("format") == FORMAT and isinstance(manifest.get("arrays"), dict):
            return manifest
    except (OSError, KeyError, TypeError, AttributeError):
        pass
    raise ManifestError(f"{file}: not a sparcom chunk manifest (format {manifest.get('format')!r})"
                        if isinstance(manifest, dict) else f"{file}: not a sparcom chunk manifest")


def find_damage(path: Path, manifest: dict, full: bool = True) -> Damage:
    path = Path(path)
    damage = Damage()
    damage.attrs = sorted(key for key in {*manifest["attrs"], *root_attrs(path)}
                          if manifest["attrs"].get(key) != root_attrs(path).get(key))
    signature = []
    for name, entry in manifest["arrays"].items():
        if not (path / name / "zarr.json").is_file() or _grid(path, name) != {k: entry[k] for k in ("shape", "chunks")}:
            damage.grids.append(name)
            continue
        present = chunk_files(path, name)
        for key in expected_chunks(path, name):
            listed, stat = entry["files"].get(key, "unlisted"), present.get(key)
            if listed == "unlisted" or (listed is not None and stat is None):
                damage.missing.setdefault(name, []).append(key)
            elif listed is None:
                if stat is not None:  # written after the manifest said the chunk was empty
                    damage.changed.setdefault(name, []).append(key)
            elif stat.st_size != listed[0]:
                damage.changed.setdefault(name, []).append(key)
            else:
                signature.append((name, key, stat.st_size, stat.st_mtime_ns))
    if damage or not full:
        return damage
    signature = tuple(signature)
    if _verified.get(str(path.resolve())) == signature:
        return damage
    for name, entry in manifest["arrays"].items():
        for key, listed in entry["files"].items():
            if listed is not None and _crc(path / name / key) != listed[1]:
                damage.changed.setdefault(name, []).append(key)
    if not damage:
        _verified[str(path.resolve())] = signature
    return damage


def upgrade_manifest(path: Path, manifest: dict) -> None:
    """Write a format 1 manifest, whose chunks all verified, in the current format: no recount."""
    if manifest.get("format") != FORMAT:
        (Path(path) / MANIFEST_NAME).write_text(json.dumps({**manifest, "format": FORMAT}), encoding="utf-8")
