"""Atomic file and folder writes: write beside the target under a hidden temporary name, then rename.

A reader (or a resumed run) sees the old file or the whole new one, never a partial one: the
rename (`os.replace`) is atomic on one filesystem, and the temporary name lies in the target's
folder. `durable=True` also fsyncs the file before the rename and the folder after it, so the
new file survives a power loss (the record stores need that; a report or a config does not).

    atomic_write_text(path, text)      atomic_write_bytes(path, data)
    with atomic_path(path) as tmp:     a file another library writes (imageio, PIL, shutil.copyfile)
    with atomic_dir(folder) as tmp:    a whole folder (an exported model), put in place at the end
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def temp_beside(path: str | os.PathLike, *, keep_suffix: bool = False) -> Path:
    """A hidden, unique temporary name in `path`'s folder: `.NAME.tmp-PID-RAND`, or with `keep_suffix`
    `.STEM.tmp-PID-RAND.SUFFIX` (for libraries that pick the format from the extension)."""
    path = Path(path)
    tag = f"tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    name = f".{path.stem}.{tag}{path.suffix}" if keep_suffix else f".{path.name}.{tag}"
    return path.with_name(name)


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so a rename or create inside it is durable (best effort: no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit(tmp: str | os.PathLike, path: str | os.PathLike, *, durable: bool = False) -> None:
    """Rename the finished file `tmp` onto `path`; `durable`: fsync the file first and the folder after."""
    if durable:
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_dir(Path(path).parent)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix) to write; on a normal exit it replaces `path`
    (`commit`), on an exception it is removed and `path` is left as it was."""
    tmp = temp_beside(path, keep_suffix=True)
    try:
        yield tmp
        commit(tmp, path, durable=durable)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = False) -> None:
    """Replace `path` with `data` atomically (module docstring)."""
    tmp = temp_beside(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        commit(tmp, path, durable=durable)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8", durable: bool = False) -> None:
    """Replace `path` with `text` atomically (module docstring)."""
    atomic_write_bytes(path, text.encode(encoding), durable=durable)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder name `.NAME.tmp` beside `path` (absent: the caller creates and fills it);
    on a normal exit that folder takes the place of `path` (an existing `path` is moved aside, then
    deleted), on an exception it is deleted.

    One writer per folder (e.g. process 0): the temporary name is fixed, so a run killed half-way
    leaves one stale folder that the next call clears, not one per attempt.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
