"""Write files and directories so that a name, once it exists, holds complete data — also after a crash.

A rename is atomic, but the kernel may persist the rename before the data it points to: after a power loss
the new name can hold an empty or short file. So every writer here follows one recipe: write a temporary
sibling, fsync its contents, rename it over the final name, fsync the parent directory (which holds the new
name). Every rename-into-place in the project goes through these functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

_BLOCK = 1 << 20


def fsync_file(path: str | Path) -> None:
    """Flush the contents of the file at `path` to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flush the entries (names) of directory `path` to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and directory under `root`, `root` included (deepest first)."""
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_file(os.path.join(directory, name))
        fsync_dir(directory)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of the file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def _tmp_sibling(path: Path) -> Path:
    # The pid keeps concurrent writers of the same name (two pipelines) off each other's temporary file.
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary sibling of `path` for writing; on a clean exit flush, fsync, rename it to `path` and
    fsync the directory. On an exception the temporary file is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        with open(tmp, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically and durably."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically and durably."""
    with atomic_open(path, "w", encoding=encoding) as handle:
        handle.write(text)
    return Path(path)


def atomic_replace_dir(tmp: str | Path, final: str | Path) -> Path:
    """Make the finished directory `tmp` appear as `final`: fsync everything under `tmp`, rename it (an
    existing `final` is moved aside first and removed after), fsync the parent.

    `tmp` must be a sibling of `final` (a rename does not cross file systems).
    """
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    old = final.with_name(f".old-{final.name}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    return final
