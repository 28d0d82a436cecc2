"""The local engine: batches over the devices of one machine.

`devices`: "cpu" runs in this process; "cpu:N" starts N worker processes on the CPU; "0,1,3"
(or "cuda:0,...") starts one process per GPU; "auto" is every GPU, or "cpu" without one.

The parent feeds a bounded task queue and listens for results. When a worker dies (a driver
fault, an out-of-memory kill), the batch it held goes back to the queue split into single jobs,
so another worker retries it and a job that crashes a worker again fails alone; after
`max_attempts` a job is recorded as failed with the crash in its error, never dropped. A dead
worker is replaced. Ctrl-C stops the feeding: queued batches are withdrawn, and every worker
finishes, exports and commits the batch it holds before the run stops.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
from collections import deque
from collections.abc import Iterator

from ..devices import gpu_count
from ..errors import UserError
from ..export import manifest as mf
from ..recipe.schema import Recipe
from ..store import Store
from . import worker
from .batch import BatchRunner, failed_rows
from .progress import Tracker


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


def run_inprocess(batches: Batches, recipe: Recipe, store: Store, tracker: Tracker, run_id: str,
                  export_threads: int) -> bool:
    """One CPU device in this process, export overlapping generation. Returns True if interrupted."""
    runner = BatchRunner(recipe, store.root, None, export_threads)
    exporting = None
    interrupted = False
    try:
        for start, rows in batches:
            future = runner.submit(start, rows, 1, f"{run_id}-{start:012d}")
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


def _count(result, tracker: Tracker) -> None:
    tracker.add(result.ok, result.failed, result.errors, result.seconds_device)


def run_workers(batches: Batches, recipe: Recipe, store: Store, devices: list[str], tracker: Tracker, run_id: str,
                export_threads: int, max_attempts: int = 2, max_restarts: int = 4) -> bool:
    """One process per device, each with its own small task queue, so the parent always knows
    which batches a worker holds. Returns True if interrupted."""
    ctx = mp.get_context("spawn")
    # A SimpleQueue writes each message to the pipe at once (no feeder thread), so a worker that
    # crashes right after reporting a batch done has still reported it.
    results = ctx.SimpleQueue()
    recipe_json = recipe.model_dump(mode="json", exclude_none=True)
    base_dir = str(recipe._base_dir) if recipe._base_dir else None
    threads = max(1, (os.cpu_count() or 1) // len(devices))

    procs: dict[int, mp.Process] = {}
    queues: dict[int, object] = {}
    held: dict[int, dict[int, tuple[list[dict], int]]] = {}  # worker → batch id → (rows, attempt)
    generating: dict[int, int] = {}  # worker → the batch on its device

    def start(wid: int) -> None:
        queues[wid] = ctx.Queue(maxsize=2)
        held[wid] = {}
        p = ctx.Process(target=worker.main, name=f"chexforge-worker-{wid}", daemon=True,
                        args=(wid, devices[wid % len(devices)], recipe_json, base_dir, store.root, export_threads,
                              threads, queues[wid], results))
        p.start()
        procs[wid] = p

    pending: deque = deque()  # retries first; fresh batches are pulled from the stream as needed
    fresh = iter(batches)
    outstanding = 0  # batches handed out or pending, not yet done or failed
    exhausted = False
    exited: set[int] = set()
    restarts = 0
    next_id = 10**12  # ids for single-job retries (above any batch offset)
    interrupted = False
    for wid in range(len(devices)):
        start(wid)
    try:
        while outstanding > 0 or not exhausted:
            for wid in list(procs):  # feed the workers with room, two batches each at most
                while wid not in exited and len(held[wid]) < 2:
                    if not pending and not exhausted:
                        try:
                            bid, rows = next(fresh)
                            pending.append((bid, rows, 1))
                            outstanding += 1
                        except StopIteration:
                            exhausted = True
                    if not pending:
                        break
                    bid, rows, attempt = pending.popleft()
                    held[wid][bid] = (rows, attempt)
                    queues[wid].put((bid, rows, attempt, f"{run_id}-{bid:012d}-a{attempt}"))
            msg = _receive(results, 0.5)
            if msg is not None:
                kind, wid = msg[0], msg[1]
                if kind == "generating":
                    generating[wid] = msg[2]
                elif kind == "done":
                    if held.get(wid, {}).pop(msg[2].batch_id, None) is not None:
                        outstanding -= 1
                        _count(msg[2], tracker)
                elif kind == "error":
                    if msg[4]:  # bad input or a write error (full disk): stop with its one line
                        raise UserError(msg[3])
                    rows, attempt = held[wid].pop(msg[2])
                    outstanding -= 1
                    _fail(store, rows, msg[3], attempt, run_id, msg[2], tracker)
                elif kind == "fatal":
                    if msg[3]:
                        raise UserError(msg[2])
                    raise RuntimeError(f"worker {wid} on {devices[wid % len(devices)]} could not start:\n{msg[2]}")
                elif kind == "exit":
                    exited.add(wid)
            # A worker that died: the batch it was generating goes back as single jobs with one more
            # attempt (so a job that kills a worker fails alone, after max_attempts); batches it only
            # queued or was exporting go back as they were. The worker is replaced.
            for wid, p in list(procs.items()):
                if p.is_alive() or wid in exited:
                    continue
                exited.add(wid)
                culprit = generating.pop(wid, None)
                for bid, (rows, attempt) in held.pop(wid, {}).items():
                    if bid != culprit:
                        pending.appendleft((bid, rows, attempt))
                        continue
                    outstanding -= 1
                    if attempt >= max_attempts:
                        _fail(store, rows, f"the worker crashed (exit code {p.exitcode}) on every attempt",
                              attempt, run_id, bid, tracker)
                        continue
                    for row in rows:
                        pending.append((next_id, [row], attempt + 1))
                        next_id += 1
                        outstanding += 1
                alive = [w for w, q in procs.items() if q.is_alive()]
                if restarts < max_restarts or not alive:
                    if restarts >= max_restarts + len(devices):
                        raise RuntimeError("workers keep crashing; the jobs they held are recorded as failed")
                    restarts += 1
                    start(max(procs) + 1)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        _stop(queues, results, procs, held, exited, tracker)
    return interrupted


def _stop(queues, results, procs, held, exited, tracker) -> None:
    """Withdraw queued batches, let every worker finish the one it holds, then join them."""
    for wid, q in queues.items():
        try:
            while True:
                q.get_nowait()
        except queue.Empty:
            pass
        if wid not in exited and procs[wid].is_alive():
            try:
                q.put(None, timeout=1)
            except queue.Full:
                pass
    deadline = time.time() + 600
    try:
        while any(p.is_alive() for w, p in procs.items() if w not in exited) and time.time() < deadline:
            msg = _receive(results, 0.5)
            if msg is None:
                for wid, p in procs.items():
                    if not p.is_alive():
                        exited.add(wid)
                continue
            if msg[0] == "done":
                held.get(msg[1], {}).pop(msg[2].batch_id, None)
                _count(msg[2], tracker)
            elif msg[0] == "exit":
                exited.add(msg[1])
    except KeyboardInterrupt:  # a second Ctrl-C: stop now (committed parts are safe)
        pass
    for p in procs.values():
        if p.is_alive():
            p.terminate()
        p.join(timeout=5)


def _receive(results, timeout: float):
    """The next message, or None after `timeout` seconds."""
    deadline = time.time() + timeout
    while results.empty():
        if time.time() >= deadline:
            return None
        time.sleep(0.02)
    return results.get()


def _fail(store: Store, rows: list[dict], error: str, attempts: int, run_id: str, bid: int, tracker: Tracker) -> None:
    mf.write_part(store, failed_rows(rows, error, attempts), f"{run_id}-{bid:012d}-failed")
    tracker.add(0, len(rows), [f"{r['job_id']}: {error}" for r in rows])
