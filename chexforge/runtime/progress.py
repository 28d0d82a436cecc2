"""Progress: the rich bar on the terminal and the heartbeat file `chexforge status` reads.

`out/.run.json` is rewritten (atomically) every few seconds while a run goes: planned, skipped,
done, failed, rate, process id, devices, engine and state (running, finished, interrupted).
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field

from ..store import Store

RUN_FILE = ".run.json"


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
                                 TimeRemainingColumn(), transient=False)
            self._bar.start()
            self._task = self._bar.add_task("generate", total=self.todo, rate="")
        self.beat("running", force=True)

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
