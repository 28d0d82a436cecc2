"""A worker process: one device, the model loaded once, batches from a queue.

The messages between the parent (pool.py) and a worker are the small frozen dataclasses below.
The parent sends a `Task` per batch, then `STOP`; the worker answers `Ready` once its model is
loaded (or `CouldNotStart`), `Generating` when a batch goes on the device (if the process dies
now, that batch is the culprit), `Done` or `Failed` when a batch is committed or could not be,
and `Exited` last. The worker ignores Ctrl-C (it starts with SIGINT blocked, pool.py): the
parent decides when to stop, and the worker always finishes and commits the batch it holds. At
most one batch exports while the next generates. A worker whose parent was killed takes no new
batch: it commits the one in hand and exits, without writing into the dead parent's pipe.
"""

from __future__ import annotations

import os
import queue
import signal
import traceback
from concurrent.futures import Future
from dataclasses import dataclass

from ..errors import UserError
from .batch import BatchResult, BatchRunner, RunSpec

# ---- parent → worker --------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """Make, export and commit one batch as manifest part `part`."""

    batch_id: int
    rows: list[dict]
    attempt: int
    part: str


STOP = None  # no more tasks: finish the batch in hand, then exit


# ---- worker → parent --------------------------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    wid: int


@dataclass(frozen=True)
class CouldNotStart:
    wid: int
    error: str  # the one-line error, or a short traceback
    user_error: bool  # bad input (a recipe the backend refuses): stop the run with its line


@dataclass(frozen=True)
class Generating:
    wid: int
    batch_id: int


@dataclass(frozen=True)
class Done:
    wid: int
    result: BatchResult


@dataclass(frozen=True)
class Failed:
    wid: int
    batch_id: int
    error: str
    user_error: bool  # bad input or a write error (full disk): stop the run with its line


@dataclass(frozen=True)
class Exited:
    wid: int


Message = Ready | CouldNotStart | Generating | Done | Failed | Exited


def main(wid: int, device: str, spec: RunSpec, threads: int, tasks, results) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked for the start-up only
    os.environ["CHEXFORGE_WORKER"] = str(wid)
    import torch

    torch.set_num_threads(max(1, threads))
    parent = os.getppid()
    runner = _start(wid, device, spec, results)
    if runner is None:
        return
    _tell(results, Ready(wid))
    _serve(wid, runner, tasks, results, parent)
    runner.close()
    _tell(results, Exited(wid))


def _tell(results, msg: Message) -> None:
    """Send a message to the parent; a parent that is gone (killed) is not an error of the worker."""
    try:
        results.put(msg)
    except OSError:  # BrokenPipeError: nobody reads the pipe any more
        pass


def _start(wid: int, device: str, spec: RunSpec, results) -> BatchRunner | None:
    """The loaded runner, or None after telling the parent why it could not start."""
    try:
        return spec.runner(device)
    except UserError as e:
        _tell(results, CouldNotStart(wid, e.line(), True))
    except Exception:  # noqa: BLE001 - reported to the parent with its traceback
        _tell(results, CouldNotStart(wid, traceback.format_exc(limit=3), False))
    return None


_NOTHING = object()  # no task came within the wait


def _serve(wid: int, runner: BatchRunner, tasks, results, parent: int) -> None:
    """Tasks until STOP (or the parent is gone), the next one generating while the last exports."""
    exporting: Future | None = None
    while True:
        try:
            task = tasks.get(timeout=1.0)
        except queue.Empty:
            task = _NOTHING
        if os.getppid() != parent:  # the parent was killed: take no new batch, stop instead of waiting forever
            break
        if task is _NOTHING:
            continue
        if task is STOP:
            break
        _tell(results, Generating(wid, task.batch_id))
        try:
            future = runner.submit(task.batch_id, task.rows, task.attempt, task.part)  # generates now, exports on a thread
        except Exception as e:  # noqa: BLE001
            _tell(results, Failed(wid, task.batch_id, f"{type(e).__name__}: {e}", isinstance(e, UserError)))
            continue
        future.add_done_callback(lambda f, b=task.batch_id: _tell(results, _outcome(f, b, wid)))
        if exporting is not None:
            exporting.exception()  # bound: the batch before this one has finished exporting
        exporting = future
    if exporting is not None:
        exporting.exception()


def _outcome(future: Future, batch_id: int, wid: int) -> Done | Failed:
    e = future.exception()
    if e is None:
        return Done(wid, future.result())
    # a write error (full disk) stops the run with one line
    text = e.line() if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
    return Failed(wid, batch_id, text, isinstance(e, UserError))
