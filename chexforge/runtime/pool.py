"""The local engine: batches over the devices of one machine.

`devices`: "cpu" runs in this process; "cpu:N" starts N worker processes on the CPU; "0,1,3"
(or "cuda:0,...") starts one process per GPU; "auto" is every GPU, or "cpu" without one.

The parent (`WorkerPool`) feeds each worker its own bounded task queue and listens for the
workers' messages (the typed protocol in worker.py). When a worker dies (a driver fault, an
out-of-memory kill), the batch it was generating goes back to the queue split into single jobs,
so another worker retries it and a job that crashes a worker again fails alone; after
`max_attempts` a job is recorded as failed with the crash in its error, never dropped. A dead
worker is replaced. Ctrl-C stops the feeding: queued batches are withdrawn, and every worker
finishes, exports and commits the batch it holds before the run stops. The first Ctrl-C is a
request (`Tracker.stopping`, progress.py) that both engines look at between batches; workers
never see it (they start with SIGINT blocked and then ignore it, see `_sigint_blocked`).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any

from ..devices import gpu_count
from ..errors import UserError
from ..export import manifest as mf
from ..store import Store
from . import worker
from .batch import BatchResult, RunSpec, failed_rows
from .progress import Tracker
from .worker import STOP, CouldNotStart, Done, Exited, Failed, Generating, Message, Task


def parse_devices(spec: str) -> list[str]:
    """'auto' | 'cpu' | 'cpu:N' | '0,1,3' | 'cuda:0,cuda:1' → device names ('inprocess' for plain cpu)."""
    spec = (spec or "auto").strip()
    if spec == "auto":
        n = gpu_count()
        return [f"cuda:{i}" for i in range(n)] or ["inprocess"]
    if spec == "cpu":
        return ["inprocess"]
    if spec.startswith("cpu:"):
        try:
            n = int(spec[4:])
        except ValueError:
            raise UserError(f"--devices cpu:N takes a number of CPU workers, not {spec!r}") from None
        if n < 1:
            raise UserError("--devices cpu:N needs N >= 1")
        return ["cpu"] * n
    out = []
    for part in spec.split(","):
        part = part.strip().removeprefix("cuda:")
        if not part.isdigit():
            raise UserError(f"--devices takes auto, cpu, cpu:N or GPU numbers like 0,1,3; not {spec!r}")
        out.append(f"cuda:{part}")
    missing = [d for d in out if int(d[5:]) >= gpu_count()]
    if missing:
        n = gpu_count()
        raise UserError(f"--devices {spec}: {', '.join(missing)} is not on this machine ({n} GPU{'s' if n != 1 else ''} here); "
                        "use --devices cpu or auto")
    return out


Batches = Iterator[tuple[int, list[dict]]]


def run_inprocess(batches: Batches, spec: RunSpec, tracker: Tracker) -> bool:
    """One CPU device in this process, export overlapping generation. Returns True if interrupted:
    then the batch being made (on a first Ctrl-C) and the one exporting are committed."""
    if tracker.stopping:
        return True
    runner = spec.runner(None)
    exporting = None
    interrupted = False
    fresh = iter(batches)
    try:
        while (batch := next(fresh, None)) is not None:
            if tracker.stopping:
                interrupted = True
                break
            start, rows = batch
            future = runner.submit(start, rows, 1, spec.part(start))
            if exporting is not None:
                _count(exporting.result(), tracker)
            exporting = future
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if exporting is not None:
            _count(exporting.result(), tracker)  # the batch in flight is committed, even on Ctrl-C
        runner.close()
    return interrupted


def run_workers(batches: Batches, spec: RunSpec, store: Store, devices: list[str], tracker: Tracker,
                max_attempts: int = 2, max_restarts: int = 4) -> bool:
    """One process per device (see WorkerPool). Returns True if interrupted."""
    return WorkerPool(spec, store, devices, tracker, max_attempts, max_restarts).run(batches)


def _count(result: BatchResult, tracker: Tracker) -> None:
    tracker.add(result.ok, result.failed, result.errors, result.seconds_device)


@dataclass
class _Worker:
    proc: BaseProcess
    tasks: Any  # its own bounded queue, so the parent always knows which batches it holds
    held: dict[int, Task] = field(default_factory=dict)  # batch id → task handed out, not yet done
    generating: int | None = None  # the batch on its device
    exited: bool = False


class WorkerPool:
    """Worker processes fed from a batch stream, each holding two batches at most."""

    QUEUED = 2  # batches handed to a worker and not yet committed: one exports while the next generates
    RETRY_IDS = 10**12  # ids for single-job retries (above any batch offset)

    def __init__(self, spec: RunSpec, store: Store, devices: list[str], tracker: Tracker, max_attempts: int = 2,
                 max_restarts: int = 4):
        self.spec, self.store, self.devices, self.tracker = spec, store, devices, tracker
        self.max_attempts, self.max_restarts = max_attempts, max_restarts
        self.ctx = mp.get_context("spawn")
        # A SimpleQueue writes each message to the pipe at once (no feeder thread), so a worker that
        # crashes right after reporting a batch done has still reported it.
        self.results = self.ctx.SimpleQueue()
        self.threads = max(1, (os.cpu_count() or 1) // len(devices))
        self.workers: dict[int, _Worker] = {}
        self.pending: deque[Task] = deque()  # retries first; fresh batches are pulled as needed
        self.outstanding = 0  # batches handed out or pending, not yet done or failed
        self.exhausted = False
        self.restarts = 0
        self.next_id = self.RETRY_IDS

    def run(self, batches: Batches) -> bool:
        """Returns True if interrupted (Ctrl-C): then every worker commits the batch it holds."""
        fresh = iter(batches)
        try:
            if self.tracker.stopping:
                return True
            for wid in range(len(self.devices)):
                self._start(wid)
            while self.outstanding > 0 or not self.exhausted:
                if self.tracker.stopping:
                    return True
                self._feed(fresh)
                for msg in self._messages(0.5):
                    self._handle(msg)
                self._reap()
        except KeyboardInterrupt:
            return True
        finally:
            self._stop()
        return False

    def _start(self, wid: int) -> None:
        tasks = self.ctx.Queue(maxsize=self.QUEUED)
        proc = self.ctx.Process(target=worker.main, name=f"chexforge-worker-{wid}", daemon=True,
                                args=(wid, self.devices[wid % len(self.devices)], self.spec, self.threads, tasks,
                                      self.results))
        with _sigint_blocked():
            proc.start()
        self.workers[wid] = _Worker(proc, tasks)

    def _task(self, batch_id: int, rows: list[dict], attempt: int) -> Task:
        return Task(batch_id, rows, attempt, self.spec.part(batch_id, f"-a{attempt}"))

    def _next(self, fresh: Iterator) -> Task | None:
        """The next task: a retry, else a fresh batch from the stream; None when there is none."""
        if not self.pending and not self.exhausted:
            try:
                batch_id, rows = next(fresh)
                self.pending.append(self._task(batch_id, rows, 1))
                self.outstanding += 1
            except StopIteration:
                self.exhausted = True
        return self.pending.popleft() if self.pending else None

    def _feed(self, fresh: Iterator) -> None:
        """Fill every live worker's queue."""
        for w in list(self.workers.values()):
            while not w.exited and len(w.held) < self.QUEUED:
                task = self._next(fresh)
                if task is None:
                    return
                w.held[task.batch_id] = task
                w.tasks.put(task)

    def _messages(self, timeout: float) -> list[Message]:
        """Every message waiting, after waiting up to `timeout` seconds for the first one."""
        first = _receive(self.results, timeout)
        if first is None:
            return []
        out = [first]
        while not self.results.empty():
            out.append(self.results.get())
        return out

    def _handle(self, msg: Message) -> None:
        match msg:
            case Generating(wid, batch_id):
                self.workers[wid].generating = batch_id
            case Done(wid, result):
                if self.workers[wid].held.pop(result.batch_id, None) is not None:
                    self.outstanding -= 1
                    _count(result, self.tracker)
            case Failed(wid, batch_id, error, user_error):
                if user_error:  # bad input or a write error (full disk): stop with its one line
                    raise UserError(error)
                task = self.workers[wid].held.pop(batch_id, None)
                if task is not None:
                    self.outstanding -= 1
                    self._fail(task, error)
            case CouldNotStart(wid, error, user_error):
                if user_error:
                    raise UserError(error)
                raise RuntimeError(f"worker {wid} on {self.devices[wid % len(self.devices)]} could not start:\n{error}")
            case Exited(wid):
                self.workers[wid].exited = True

    def _reap(self) -> None:
        """Replace every worker that died, its batches back in the queue."""
        for w in list(self.workers.values()):
            if w.exited or w.proc.is_alive():
                continue
            w.exited = True
            self._requeue(w)
            self._replace()

    def _requeue(self, w: _Worker) -> None:
        """A dead worker's batches: the one it was generating goes back as single jobs with one more
        attempt (so a job that kills a worker fails alone, after max_attempts); batches it only
        queued or was exporting go back as they were."""
        culprit, w.generating = w.generating, None
        held, w.held = w.held, {}
        for batch_id, task in held.items():
            if batch_id != culprit:
                self.pending.appendleft(task)
                continue
            self.outstanding -= 1
            if task.attempt >= self.max_attempts:
                self._fail(task, f"the worker crashed (exit code {w.proc.exitcode}) on every attempt")
                continue
            for row in task.rows:
                self.pending.append(self._task(self.next_id, [row], task.attempt + 1))
                self.next_id += 1
                self.outstanding += 1

    def _replace(self) -> None:
        alive = [w for w in self.workers.values() if w.proc.is_alive()]
        if self.restarts < self.max_restarts or not alive:
            if self.restarts >= self.max_restarts + len(self.devices):
                raise RuntimeError("workers keep crashing; the jobs they held are recorded as failed")
            self.restarts += 1
            self._start(max(self.workers) + 1)

    def _fail(self, task: Task, error: str) -> None:
        """Record a batch's jobs as failed (they could not be made at all)."""
        mf.write_part(self.store, failed_rows(task.rows, error, task.attempt), self.spec.part(task.batch_id, "-failed"))
        self.tracker.add(0, len(task.rows), [f"{r['job_id']}: {error}" for r in task.rows])

    def _stop(self) -> None:
        """Withdraw queued batches, let every worker finish the one it holds, then join them."""
        for w in self.workers.values():
            _withdraw(w)
        running = [w for w in self.workers.values() if not w.exited]
        deadline = time.time() + 600
        try:
            while any(w.proc.is_alive() for w in running if not w.exited) and time.time() < deadline:
                messages = self._messages(0.5)
                if not messages:
                    for w in running:
                        w.exited = w.exited or not w.proc.is_alive()
                for msg in messages:
                    match msg:
                        case Done(wid, result):
                            self.workers[wid].held.pop(result.batch_id, None)
                            _count(result, self.tracker)
                        case Exited(wid):
                            self.workers[wid].exited = True
        except KeyboardInterrupt:  # a second Ctrl-C: stop now (committed parts are safe)
            pass
        for w in self.workers.values():
            if w.proc.is_alive():
                w.proc.terminate()
            w.proc.join(timeout=5)


@contextmanager
def _sigint_blocked() -> Iterator[None]:
    """SIGINT blocked in this thread while a worker process starts. The child inherits the signal
    mask through fork and exec, so a Ctrl-C at the terminal (sent to the whole process group) cannot
    interrupt its start-up (seconds of imports and unpickling) before worker.main ignores SIGINT;
    the parent loses nothing: a SIGINT meanwhile waits, or is taken by another thread, and its
    handler runs all the same. CPython's multiprocessing starts its resource tracker this way."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _withdraw(w: _Worker) -> None:
    """Take back the batches a worker has not started, and tell a live one to stop."""
    try:
        while True:
            w.tasks.get_nowait()
    except queue.Empty:
        pass
    if not w.exited and w.proc.is_alive():
        try:
            w.tasks.put(STOP, timeout=1)
        except queue.Full:
            pass


def _receive(results, timeout: float):
    """The next message, or None after `timeout` seconds."""
    deadline = time.time() + timeout
    while results.empty():
        if time.time() >= deadline:
            return None
        time.sleep(0.02)
    return results.get()
