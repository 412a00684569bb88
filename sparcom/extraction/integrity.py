"""Chunk manifests: what a finished Zarr store holds, so a missing or damaged chunk is found.

- `chunk_manifest(path)`: the size and CRC-32 of every chunk file of every array in the store,
  written once when the store is finished.
- `find_damage(path, manifest, full)`: the chunks that are missing, resized or (with `full`)
  whose bytes changed, per array. Without `full` only file sizes are read (a stat per chunk).
- `chunk_files(path, name)`: an array's chunk files present on disk, by chunk key.
- `expected_chunks(path, name)`: every chunk key an array's chunk grid has, to check that a
  store being finished lacks none (empty chunks are written too, see `sparcom.extraction.store`).

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
SKIPPED = ("progress",)  # resume bookkeeping of a store being written, not data
_verified: dict[str, tuple] = {}


@dataclass
class Damage:
    """Per array, chunk keys (such as 'c/3/0/0') that are missing or changed."""
    missing: dict[str, list[str]] = field(default_factory=dict)
    changed: dict[str, list[str]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.missing or self.changed)

    def arrays(self) -> dict[str, list[str]]:
        merged: dict[str, list[str]] = {}
        for part in (self.missing, self.changed):
            for name, keys in part.items():
                merged.setdefault(name, []).extend(keys)
        return merged


def _arrays(path: Path) -> list[str]:
    """Names of the store's arrays (folders holding a zarr.json of node_type array)."""
    names = []
    for meta in sorted(Path(path).rglob("zarr.json")):
        folder = meta.parent.relative_to(path)
        if folder == Path(".") or folder.parts[0] in SKIPPED:
            continue
        if json.loads(meta.read_text()).get("node_type") == "array":
            names.append(folder.as_posix())
    return names


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


def chunk_manifest(path: Path) -> dict:
    path = Path(path)
    return {"format": 1, "arrays": {
        name: {key: [stat.st_size, _crc(path / name / key)] for key, stat in sorted(chunk_files(path, name).items())}
        for name in _arrays(path)}}


def expected_chunks(path: Path, name: str) -> list[str]:
    meta = json.loads((Path(path) / name / "zarr.json").read_text())
    shape = meta["shape"]
    chunks = meta["chunk_grid"]["configuration"]["chunk_shape"]
    grid = [range(math.ceil(s / c)) for s, c in zip(shape, chunks)]
    return ["c/" + "/".join(map(str, index)) for index in itertools.product(*grid)]


def find_damage(path: Path, manifest: dict, full: bool = True) -> Damage:
    path = Path(path)
    damage = Damage()
    signature = []
    for name, listed in manifest["arrays"].items():
        present = chunk_files(path, name)
        for key, (size, crc) in listed.items():
            stat = present.get(key)
            if stat is None:
                damage.missing.setdefault(name, []).append(key)
            elif stat.st_size != size:
                damage.changed.setdefault(name, []).append(key)
            else:
                signature.append((name, key, stat.st_size, stat.st_mtime_ns))
    if damage or not full:
        return damage
    signature = tuple(signature)
    if _verified.get(str(path.resolve())) == signature:
        return damage
    for name, listed in manifest["arrays"].items():
        for key, (_, crc) in listed.items():
            if _crc(path / name / key) != crc:
                damage.changed.setdefault(name, []).append(key)
    if not damage:
        _verified[str(path.resolve())] = signature
    return damage
