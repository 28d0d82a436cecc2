"""Where a run's output lives: a local folder or an fsspec URL (s3://, gs://, file://, ...).

Every write is all-or-nothing: local files go to a temporary sibling that is fsynced and renamed;
fsspec targets are written under a temporary key and moved into place. A reader therefore sees
either nothing or the whole file, and temporaries (`.tmp-*`) left by a kill are swept on resume.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import shutil
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

from . import atomic
from .errors import UserError


def open_store(root: str | Path) -> Store:
    text = str(root)
    if "://" in text and not text.startswith("file://"):
        return FsspecStore(text)
    if text.startswith("file://"):
        return FsspecStore(text)  # through fsspec too: the same code path as remote stores
    return LocalStore(Path(text))


class Store:
    root: str

    def write_bytes(self, rel: str, data: bytes) -> str:
        raise NotImplementedError

    def read_bytes(self, rel: str) -> bytes:
        raise NotImplementedError

    def exists(self, rel: str) -> bool:
        raise NotImplementedError

    def glob(self, pattern: str) -> list[str]:
        """Relative paths matching `pattern` (relative to the root)."""
        raise NotImplementedError

    def remove(self, rel: str) -> None:
        raise NotImplementedError

    def size(self, rel: str) -> int | None:
        """The file's size in bytes; None when there is no such file."""
        raise NotImplementedError

    def files(self, rel: str = "") -> Iterator[str]:
        """Every file under the folder `rel` (recursively), as paths relative to the root."""
        raise NotImplementedError

    def move(self, rel: str, dest: str) -> None:
        """Rename a file within the store (dest's folder is created)."""
        raise NotImplementedError

    def remove_tree(self, rel: str) -> None:
        raise NotImplementedError

    def sweep(self) -> int:
        """Delete the temporaries a killed writer left behind."""
        raise NotImplementedError

    def sync(self) -> None:
        """Make completed renames durable (local folders)."""

    def local_path(self, rel: str = "") -> Path | None:
        return None

    def write_text(self, rel: str, text: str) -> str:
        return self.write_bytes(rel, text.encode("utf-8"))

    @contextlib.contextmanager
    def open_write(self, rel: str):
        """A binary file to stream into; it replaces `rel` only when the block ends without error."""
        import tempfile

        with tempfile.TemporaryFile() as tmp:  # spooled locally, then committed as one write
            yield tmp
            tmp.seek(0)
            self.write_bytes(rel, tmp.read())

    def __str__(self) -> str:
        return self.root


class LocalStore(Store):
    def __init__(self, root: Path):
        self.path = Path(root)
        self.root = str(root)

    def local_path(self, rel: str = "") -> Path:
        return self.path / rel if rel else self.path

    def _abs(self, rel: str) -> str:
        return os.path.join(self.root, rel)  # a string: see atomic.atomic_open on pathlib

    def write_bytes(self, rel: str, data: bytes) -> str:
        return atomic.write_bytes(self._abs(rel), data)

    def read_bytes(self, rel: str) -> bytes:
        return (self.path / rel).read_bytes()

    @contextlib.contextmanager
    def open_write(self, rel: str):
        try:
            with atomic.atomic_open(self._abs(rel)) as f:
                yield f
        except OSError as e:
            raise atomic.disk_error(e, self._abs(rel)) from None

    def exists(self, rel: str) -> bool:
        return os.path.exists(self._abs(rel))

    def glob(self, pattern: str) -> list[str]:
        return sorted(p.relative_to(self.path).as_posix() for p in self.path.glob(pattern))

    def remove(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.path / rel).unlink()

    def size(self, rel: str) -> int | None:
        try:
            st = os.stat(self._abs(rel))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def files(self, rel: str = "") -> Iterator[str]:
        top = self._abs(rel) if rel else self.root
        for folder, dirs, names in os.walk(top):
            dirs.sort()
            head = os.path.relpath(folder, self.root).replace(os.sep, "/")
            for name in sorted(names):
                yield name if head == "." else f"{head}/{name}"

    def move(self, rel: str, dest: str) -> None:
        os.makedirs(os.path.dirname(self._abs(dest)), exist_ok=True)
        os.replace(self._abs(rel), self._abs(dest))
        atomic.fsync_dir(os.path.dirname(self._abs(dest)))

    def remove_tree(self, rel: str) -> None:
        p = self.path / rel
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()

    def sweep(self) -> int:
        return atomic.sweep_temporaries(self.path) if self.path.exists() else 0

    def sync(self) -> None:
        atomic.fsync_dir(self.path)

    def mkdir(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise not_a_folder(self.root)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise not_a_folder(self.root, parent=True) from None
        except OSError as e:
            raise atomic.disk_error(e, self.path, resume=False) from None


class FsspecStore(Store):
    def __init__(self, url: str):
        import fsspec

        self.root = url.rstrip("/")
        self.fs, self.base = fsspec.core.url_to_fs(self.root)

    def _key(self, rel: str) -> str:
        return posixpath.join(self.base, rel) if rel else self.base

    def local_path(self, rel: str = "") -> Path | None:
        from fsspec.implementations.local import LocalFileSystem

        return Path(self._key(rel)) if isinstance(self.fs, LocalFileSystem) else None

    def write_bytes(self, rel: str, data: bytes) -> str:
        key = self._key(rel)
        head, name = posixpath.split(key)
        tmp = posixpath.join(head, f"{atomic.TMP_PREFIX}{name}.{uuid.uuid4().hex[:12]}")
        try:
            self.fs.makedirs(head, exist_ok=True)
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, key)
        except OSError as e:
            with contextlib.suppress(Exception):
                self.fs.rm(tmp)
            raise atomic.disk_error(e, key) from None
        return hashlib.sha256(data).hexdigest()

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self._key(rel))

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self._key(rel))

    def glob(self, pattern: str) -> list[str]:
        found = self.fs.glob(self._key(pattern))
        base = self.base.rstrip("/") + "/"
        return sorted(p[len(base):] if p.startswith(base) else p for p in found)

    def remove(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._key(rel))

    def size(self, rel: str) -> int | None:
        try:
            info = self.fs.info(self._key(rel))
        except (FileNotFoundError, OSError):
            return None
        return int(info["size"]) if info.get("type") == "file" else None

    def files(self, rel: str = "") -> Iterator[str]:
        top = self._key(rel)
        if not self.fs.exists(top):
            return
        base = self.base.rstrip("/") + "/"
        for p in sorted(self.fs.find(top)):
            yield p[len(base):] if p.startswith(base) else p

    def move(self, rel: str, dest: str) -> None:
        self.fs.makedirs(posixpath.dirname(self._key(dest)), exist_ok=True)
        self.fs.mv(self._key(rel), self._key(dest))

    def remove_tree(self, rel: str) -> None:
        if self.fs.exists(self._key(rel)):
            self.fs.rm(self._key(rel), recursive=True)

    def sweep(self) -> int:
        if not self.fs.exists(self.base):
            return 0
        stale = [p for p in self.fs.find(self.base) if posixpath.basename(p).startswith(atomic.TMP_PREFIX)]
        for p in stale:
            with contextlib.suppress(Exception):
                self.fs.rm(p)
        return len(stale)

    def mkdir(self) -> None:
        try:
            if self.fs.isfile(self.base):
                raise not_a_folder(self.root)
            self.fs.makedirs(self.base, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise not_a_folder(self.root, parent=True) from None
        except OSError as e:
            raise atomic.disk_error(e, self.root, resume=False) from None


def not_a_folder(where: str, parent: bool = False) -> UserError:
    what = "a part of this path is a file" if parent else "this is a file"
    return UserError(f"{what}, not a folder: an output must be a folder (it is created when missing)", where)


def as_store(target: Store | str | Path) -> Store:
    return target if isinstance(target, Store) else open_store(target)


def local_or_error(store: Store, what: str) -> Path:
    p = store.local_path()
    if p is None:
        raise UserError(f"{what} works on local folders only", store.root)
    return p


__all__ = ["Store", "LocalStore", "FsspecStore", "open_store", "as_store", "local_or_error"]
