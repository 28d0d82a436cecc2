"""One writer per output folder: `generate` and `merge` hold an exclusive lock on their --out.

The lock is the file OUT/.chexforge.lock, naming its holder (host, process id, start time,
command). A second writer gets one line naming the holder and exit status 2.

Local folders (and file:// URLs): the holder keeps an flock on the lock file. The kernel drops
it when the process dies, however it dies, so a lock left by a dead process on this host is
taken over safely (no pid-reuse guess, no race between two runs starting at once). On NFS,
Linux maps flock to POSIX record locks, so the lock also holds across the machines sharing the
file system. A lock file naming a process on *another* host that is not flock-held any more
(its host crashed, or the file system does not share locks between machines) cannot be judged
from here: the run is refused with the holder and the way out, `--break-lock`. On a file system
without flock, a lock file of this host whose process is gone (pid and process start time) is
taken over.

Object stores (s3://, gs://, ...) have no exclusive create through fsspec: there the lock is a
plain object, written then read back. It stops a second run started while the first one runs
(the common mistake), not two started within the same instant; `--break-lock` removes a stale
one. A released lock is deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import sys
import time
import uuid
from dataclasses import asdict, dataclass

from ..errors import UserError
from ..store import Store

try:
    import fcntl
except ImportError:  # not POSIX: the lock file and the process check only
    fcntl = None

LOCK_FILE = ".chexforge.lock"


def current_command() -> str:
    """This process's command line, as a user would type it."""
    argv = list(sys.argv)
    if argv and (argv[0].endswith(os.path.join("chexforge", "cli.py")) or os.path.basename(argv[0]) == "chexforge"):
        argv[0] = "chexforge"
    text = shlex.join(argv) if argv and argv[0] else "python"
    return text if len(text) <= 300 else text[:299] + "…"


def _process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: float  # epoch seconds
    command: str
    process_start: str | None = None
    token: str = ""

    @classmethod
    def me(cls, command: str | None = None) -> Holder:
        pid = os.getpid()
        return cls(socket.gethostname(), pid, time.time(), command or current_command(), _process_start(pid),
                   uuid.uuid4().hex)

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"{self.command} (pid {self.pid} on host {self.host}, started {when})"

    def here(self) -> bool:
        return self.host == socket.gethostname()

    def alive(self) -> bool:
        """Whether the holder process still runs (only knowable on this host: elsewhere True)."""
        if not self.here():
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # someone else's process, alive
        except (OSError, ValueError, OverflowError):
            return False
        now = _process_start(self.pid)
        return self.process_start is None or now is None or now == self.process_start

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def parse(cls, data: bytes) -> Holder | None:
        try:
            d = json.loads(data)
            return cls(str(d["host"]), int(d["pid"]), float(d["started"]), str(d["command"]),
                       d.get("process_start"), str(d.get("token", "")))
        except (ValueError, KeyError, TypeError):
            return None  # empty (being written, or released) or not ours: no holder


def _busy(out: str, holder: Holder | None) -> UserError:
    who = holder.describe() if holder else "another chexforge process"
    return UserError(f"another run is writing here: {who}; wait for it to finish, or use another --out", out)


def _foreign(out: str, holder: Holder) -> UserError:
    return UserError(f"locked by {holder.describe()}; chexforge cannot see the processes of host {holder.host} from here: "
                     "if that run is gone, run again with --break-lock", out)


class OutputLock:
    """The exclusive lock of an output folder; a context manager. `break_lock` takes over a lock
    that cannot be judged stale from here (another host's), never one held by a live process here."""

    def __init__(self, store: Store, command: str | None = None, break_lock: bool = False):
        self.store = store
        self.break_lock = break_lock
        self.holder = Holder.me(command)
        self._fd: int | None = None
        self._path: str | None = None
        self.took_over: Holder | None = None  # the stale holder this lock replaced, if any

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        local = self.store.local_path()
        if local is not None:
            self._path = os.path.join(os.fspath(local), LOCK_FILE)
            self._acquire_local()
        else:
            self._acquire_store()

    # ---- local folders -------------------------------------------------------------------------

    def _acquire_local(self) -> None:
        path, out = self._path, self.store.root
        for _ in range(100):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
            except OSError as e:
                from ..atomic import disk_error

                raise disk_error(e, path) from None
            locked = self._flock(fd)
            if locked is None:  # held: by a live process, here or (through NFS) elsewhere
                holder = _read_fd(fd)
                os.close(fd)
                raise _busy(out, holder)
            try:
                same = _same_file(fd, path)
            except OSError:
                same = False
            if not same:  # its holder released (deleted) it between our open and our flock: again
                os.close(fd)
                continue
            old = _read_fd(fd)
            if old is not None and not self.break_lock:
                if not old.here():
                    os.close(fd)
                    raise _foreign(out, old)
                if not locked and old.alive():  # no flock on this file system: the process decides
                    os.close(fd)
                    raise _busy(out, old)
            self.took_over = old
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, self.holder.to_bytes(), 0)
                os.fsync(fd)
            except OSError as e:
                os.close(fd)
                from ..atomic import disk_error

                raise disk_error(e, path) from None
            self._fd = fd
            return
        raise _busy(out, None)

    @staticmethod
    def _flock(fd: int) -> bool | None:
        """True: locked; False: this file system has no flock; None: someone holds it."""
        if fcntl is None:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return None
        except OSError:  # ENOLCK, EOPNOTSUPP, EINVAL: no locks here
            return False

    # ---- object stores -------------------------------------------------------------------------

    def _acquire_store(self) -> None:
        store, out = self.store, self.store.root
        if store.exists(LOCK_FILE) and not self.break_lock:
            old = Holder.parse(store.read_bytes(LOCK_FILE))
            if old is not None:
                if not old.here():
                    raise _foreign(out, old)
                if old.alive():
                    raise _busy(out, old)
                self.took_over = old
        store.write_bytes(LOCK_FILE, self.holder.to_bytes())
        back = Holder.parse(store.read_bytes(LOCK_FILE))
        if back is None or back.token != self.holder.token:  # another run wrote it in the same instant
            raise _busy(out, back)

    # ---- release -------------------------------------------------------------------------------

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                if _same_file(fd, self._path):
                    os.unlink(self._path)  # while still locked: a waiting opener sees it gone and retries
            os.close(fd)
        elif self._path is None:
            with contextlib.suppress(Exception):
                back = Holder.parse(self.store.read_bytes(LOCK_FILE))
                if back is not None and back.token == self.holder.token:
                    self.store.remove(LOCK_FILE)


def _same_file(fd: int, path: str) -> bool:
    a, b = os.fstat(fd), os.stat(path)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_fd(fd: int) -> Holder | None:
    try:
        return Holder.parse(os.pread(fd, 65536, 0))
    except OSError:
        return None


def holder_of(store: Store) -> Holder | None:
    """The holder named in the folder's lock file while its process runs (as far as this host can
    tell: a process of another host counts as running); None when the folder is not locked."""
    try:
        if not store.exists(LOCK_FILE):
            return None
        holder = Holder.parse(store.read_bytes(LOCK_FILE))
    except OSError:
        return None
    return holder if holder is not None and holder.alive() else None


__all__ = ["LOCK_FILE", "Holder", "OutputLock", "current_command", "holder_of"]
