"""Hashing, the bottom layer of every content key: no other `sparcom` module is imported here.

- `content_hash(*parts)`: the sha256 of parts (settings models, strings, numbers) as sorted JSON.
- `file_sha256(path)`: a file's sha256, read in blocks.
- `input_fingerprint(path)`: a hash of a file's or a directory tree's content.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import BaseModel


def content_hash(*parts: object) -> str:
    text = json.dumps([p.model_dump(mode="json") if isinstance(p, BaseModel) else p for p in parts],
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def input_fingerprint(path: Path) -> str:
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        digest.update(file_sha256(file).encode())
    return digest.hexdigest()
