"""Progress: the rich bar on the terminal, the heartbeat file `chexforge status` reads, and
what Ctrl-C does to a run.

`out/.run.json` is rewritten (atomically) every few seconds while a run goes: planned, skipped,
done, failed, rate, process id, devices, engine and state (running, finished, interrupted).

Ctrl-C (`CtrlC`): the run holds its own SIGINT handler from before its first batch until its end
is committed. The first Ctrl-C only asks the run to stop (`Tracker.stopping`): the local engines
look between batches, withdraw what is queued and commit every batch in hand, and the run ends
as interrupted. A Ctrl-C while the run prepares stops it before its first batch; one after its
last batch was made lets it commit its end (it has nothing left to stop). A second Ctrl-C raises
KeyboardInterrupt at once (committed parts are safe). Python's own handler instead raises
KeyboardInterrupt wherever the main thread happens to be: in the middle of a heartbeat, a part
compaction, the start of a worker process, or the final manifest merge.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

from ..store import Store

RUN_FILE = ".run.json"


def _console():
    """The bar's console. Piped (a CI log), rich falls back to 80 columns and crops the bar's
    counts and ETA; there it takes $COLUMNS if set (rich reads it), else 200, as cli.py's do."""
    from rich.console import Console

    piped = not (hasattr(sys.stdout, "isatty") and sys.stdout.isatty())
    return Console(width=200 if piped and not os.environ.get("COLUMNS", "").isdigit() else None)


class CtrlC:
    """SIGINT handling for one run (a context manager; see the module docstring). Installed only
    in the main thread (the only one that may set handlers) and only when SIGINT is not ignored
    (a background job started without job control keeps ignoring it, as Python itself does);
    otherwise, and when a run is already inside one, it changes nothing."""

    _current: CtrlC | None = None  # the one installed in this process

    SAYS = {  # what the first Ctrl-C does, by the phase of the run
        "preparing": "stopping before the first batch",
        "local": "stopping: committing the batches in hand",
        "finishing": "every batch is made: committing the end of the run",
    }

    def __init__(self) -> None:
        self.presses = 0
        self.phase = "preparing"  # preparing | local | ray (stops on KeyboardInterrupt only) | finishing
        self._previous = None
        self._installed = False

    def __enter__(self) -> CtrlC:
        if CtrlC._current is not None or threading.current_thread() is not threading.main_thread():
            return self
        previous = signal.getsignal(signal.SIGINT)
        if previous is signal.SIG_IGN or previous is None:
            return self
        self._previous = previous
        signal.signal(signal.SIGINT, self._handle)
        self._installed, CtrlC._current = True, self
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed, CtrlC._current = False, None

    def _handle(self, signum: int, frame: object) -> None:
        self.presses += 1
        if self.presses > 1 or self.phase == "ray":
            raise KeyboardInterrupt
        try:  # os.write: a handler must not re-enter a buffered stream the main thread may be writing
            os.write(sys.stderr.fileno(), f"{self.SAYS[self.phase]} (Ctrl-C again to stop at once)\n".encode())
        except (OSError, ValueError, AttributeError):
            pass

    @classmethod
    def current(cls) -> CtrlC | None:
        return cls._current


@dataclass
class Tracker:
    store: Store
    planned: int
    skipped: int
    todo: int
    devices: list[str]
    engine: str
    show: bool = True
    done: int = 0
    failed: int = 0
    device_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    compact_every: int = 256  # batches between part compactions (keeps the part count small)
    _batches: int = 0
    _last_beat: float = 0.0
    _bar: object = None
    _task: object = None

    def __post_init__(self) -> None:
        ctrl_c = CtrlC.current()
        if ctrl_c is not None:
            ctrl_c.phase = "ray" if self.engine == "ray" else "local"
        if self.show and self.todo:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(TextColumn("[bold]generating"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                 TimeRemainingColumn(), transient=False, console=_console())
            self._bar.start()
            self._task = self._bar.add_task("generate", total=self.todo, rate="")
        self.beat("running", force=True)

    @property
    def stopping(self) -> bool:
        """Whether Ctrl-C asked this run to stop (the engines look between batches)."""
        ctrl_c = CtrlC.current()
        return ctrl_c is not None and ctrl_c.presses > 0

    @property
    def rate(self) -> float:
        return (self.done + self.failed) / max(time.time() - self.started, 1e-9)

    def add(self, ok: int, failed: int, errors: list[str], device_seconds: float = 0.0) -> None:
        self.done += ok
        self.failed += failed
        self.errors += errors
        self.device_seconds += device_seconds
        if self._bar is not None:
            self._bar.update(self._task, advance=ok + failed, rate=f"{self.rate:.2f} img/s")
        self._batches += 1
        if self._batches % self.compact_every == 0:
            from ..export.manifest import compact_parts

            compact_parts(self.store)
        self.beat("running")

    def beat(self, state: str, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last_beat < 2.0:
            return
        self._last_beat = now
        info = {"state": state, "pid": os.getpid(), "host": socket.gethostname(), "engine": self.engine,
                "devices": self.devices, "started": self.started, "updated": now, "planned": self.planned,
                "skipped": self.skipped, "todo": self.todo, "done": self.done, "failed": self.failed,
                "rate": self.rate, "errors": self.errors[-5:]}
        try:
            self.store.write_text(RUN_FILE, json.dumps(info, indent=1))
        except Exception:  # noqa: BLE001 - a heartbeat must never stop a run
            pass

    def close(self, state: str) -> None:
        ctrl_c = CtrlC.current()
        if ctrl_c is not None:  # the engine is done: a first Ctrl-C now lets the end be committed
            ctrl_c.phase = "finishing"
        if self._bar is not None:
            self._bar.stop()
        self.beat(state, force=True)


def read_run(store: Store) -> dict | None:
    if not store.exists(RUN_FILE):
        return None
    try:
        return json.loads(store.read_bytes(RUN_FILE))
    except (ValueError, OSError):
        return None


def alive(info: dict) -> bool:
    """Whether the process that wrote the heartbeat still runs (same host only)."""
    if info.get("host") != socket.gethostname():
        return time.time() - info.get("updated", 0) < 30
    try:
        os.kill(int(info["pid"]), 0)
    except (OSError, KeyError, ValueError):
        return False
    return True
