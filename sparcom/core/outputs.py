"""Outputs that never destroy what the tool did not write, and are never seen half-written.

- `building(target, kind, keep_existing=False)`: a context manager yielding a fresh temporary
  sibling folder to build the output in. On success the folder gets the tool's marker file
  (naming `kind`) and moves into place in one rename; an earlier output of the same kind is
  moved aside first and removed after. `keep_existing=True`: when another process put the
  target there first, theirs is kept and the new build dropped (content-addressed outputs).
  On error the temporary folder is removed and the target is untouched.
- `claimed(folder, kind)`: a folder that several writers fill file by file (a run folder): it is
  created with the marker, or must already carry it; held under the lock meanwhile.
- `check_output(target, kind)`: the refusal alone, for checking before any work is done: a
  target that exists, is not empty and is not an earlier output of the same kind (its marker)
  is an OutputError; so is one that cannot be written (under a file, on a read-only file
  system, under /proc).
- `check_output_file(path)`: the same for a single-file output: an existing path is refused.
- `write_file_atomically(path, text)`: one file, written beside and renamed over.

Writers of one target are serialised by a lock file beside it (`.NAME.lock`, an flock, so a
killed process releases it); the lock is reentrant within a process. The holder removes the file
when done (no empty lock files stay in users' folders); a waiting writer whose file was removed
meanwhile locks afresh, so removing a lock file never lets two writers in.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MARKER = ".sparcom-output"
_held: dict[str, tuple[int, int]] = {}  # lock path -> (file descriptor, depth)


class OutputError(ValueError):
    pass


def _kind_of(folder: Path) -> str | None:
    try:
        return json.loads((folder / MARKER).read_text())["kind"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_output(target: Path, kind: str) -> None:
    target = Path(target)
    _check_writable(target)
    if not target.exists():
        return
    if not target.is_dir():
        raise OutputError(f"{target}: exists and is a file, not a {kind} folder; choose another output path")
    if any(target.iterdir()) and _kind_of(target) != kind:
        raise OutputError(f"{target}: exists, is not empty and was not written by sparcom as a {kind}; "
                          "choose another output path (nothing was changed)")


def check_output_file(path: Path) -> None:
    """A single-file output (JSONL) must be new: an existing file or folder there is the user's."""
    path = Path(path)
    _check_writable(path)
    if path.exists():
        raise OutputError(f"{path}: exists; choose another output file or delete it (nothing was changed)")


def _check_writable(target: Path) -> None:
    """The output's nearest existing ancestor must be a folder one can create entries in: known
    before any work, not from a traceback at the end of it."""
    ancestor = target.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"{target}: {ancestor} is a file, not a folder; choose another output path")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".sparcom-probe-", dir=ancestor))
    except OSError as error:
        raise OutputError(f"{target}: cannot write in {ancestor} ({error.strerror}); "
                          "choose another output path") from None


def _acquire(lock: Path) -> int:
    """An flock on `lock`, re-checked after locking: a holder removes the file when it is done,
    so a lock taken on a file since removed (or replaced) is no lock; then again."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits for another writer of the same target
        try:
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextmanager
def _locked(target: Path) -> Iterator[None]:
    lock = Path(target).parent / f".{Path(target).name}.lock"
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        key = str(lock.resolve())
        if key not in _held:
            _held[key] = (_acquire(lock), 0)
    except OSError as error:
        raise OutputError(f"{target}: cannot write there ({error.strerror}); choose another output path") from None
    fd, depth = _held[key]
    _held[key] = (fd, depth + 1)
    try:
        yield
    finally:
        fd, depth = _held[key]
        if depth > 1:
            _held[key] = (fd, depth - 1)
        else:
            del _held[key]
            lock.unlink(missing_ok=True)  # while still held: the next writer re-checks the file
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _mark(folder: Path, kind: str) -> None:
    (folder / MARKER).write_text(json.dumps({"kind": kind, "pid": os.getpid()}))


@contextmanager
def building(target: Path, kind: str, keep_existing: bool = False) -> Iterator[Path]:
    target = Path(target)
    with _locked(target):
        check_output(target, kind)
        partial = target.with_name(f".{target.name}.{os.getpid()}.building")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        try:
            yield partial
            _mark(partial, kind)
            if target.exists() and keep_existing:
                shutil.rmtree(partial)
                return
            aside = target.with_name(f".{target.name}.{os.getpid()}.replaced")
            if target.exists():
                target.rename(aside)
            partial.rename(target)
            shutil.rmtree(aside, ignore_errors=True)
        finally:
            shutil.rmtree(partial, ignore_errors=True)


@contextmanager
def claimed(folder: Path, kind: str) -> Iterator[Path]:
    folder = Path(folder)
    with _locked(folder):
        check_output(folder, kind)
        folder.mkdir(parents=True, exist_ok=True)
        if _kind_of(folder) != kind:
            _mark(folder, kind)
        yield folder


def write_file_atomically(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(text)
    partial.replace(path)
