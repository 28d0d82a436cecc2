"""Crash-safe file writing: write a temporary sibling, fsync, rename over the target.

A reader sees either the old file or the complete new one, never a torn write, whatever
kills the process. Temporary files carry a `.tmp-` prefix so a resumed run can sweep them.
The file gets the mode a plain open() would give it (0o666 less the umask: 0644 under umask
022), not the 0600 of a private temporary file, so a dataset on a shared folder is readable by
whoever the umask lets read it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import UserError

TMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """Open a temp file next to `path` for binary writing; on success it replaces `path`."""
    # Plain strings, not pathlib: Python 3.11's pathlib interns every path part, so a million
    # distinct image names would grow the interpreter's intern table for the whole run.
    path = os.fspath(path)
    parent, name = os.path.split(path)
    parent = parent or "."
    os.makedirs(parent, exist_ok=True)
    fd, tmp = _create_temporary(parent, name)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _create_temporary(parent: str, name: str) -> tuple[int, str]:
    """A new, unique temporary sibling opened for writing. Created as open() creates files (mode
    0o666, the kernel applies the umask and any default ACL), exclusively (O_EXCL), so it is never
    someone else's file; mkstemp would make it 0600."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = os.path.join(parent, f"{TMP_PREFIX}{name}.{secrets.token_hex(6)}")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unique temporary name", os.path.join(parent, name))


def write_bytes(path: str | Path, data: bytes) -> str:
    """Atomically write `data`; return its SHA-256 hex digest."""
    try:
        with atomic_open(path) as f:
            f.write(data)
    except OSError as e:
        raise disk_error(e, path) from None
    return hashlib.sha256(data).hexdigest()


def write_text(path: str | Path, text: str) -> str:
    return write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: str | Path) -> None:
    """Make a rename in `path` durable (POSIX); a no-op where directories cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sweep_temporaries(root: str | Path) -> int:
    """Delete temp files a killed run left behind; return how many."""
    n = 0
    for p in Path(root).rglob(TMP_PREFIX + "*"):
        with contextlib.suppress(OSError):
            p.unlink()
            n += 1
    return n


def disk_error(e: OSError, path: str | Path, resume: bool = True) -> UserError:
    """Turn a write failure into one clear line (full disk, read-only or forbidden output).
    `resume`: say that committed work is intact and a re-run resumes (not when nothing began)."""
    reasons = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exceeded",
        errno.EROFS: "the output is on a read-only file system",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
    }
    why = reasons.get(e.errno, e.strerror or type(e).__name__)
    if not resume:
        return UserError(f"cannot write: {why}", path)
    return UserError(f"cannot write: {why}; everything committed before this is intact, re-run to resume", path)
