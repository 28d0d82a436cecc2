"""A worker process: one device, the model loaded once, batches from a queue.

Messages to the parent: ("ready", wid), ("generating", wid, batch_id), ("done", wid, BatchResult),
("error", wid, batch_id, text, user_error), ("fatal", wid, text), ("exit", wid). The worker
ignores Ctrl-C: the parent decides when to stop, and the worker always finishes and commits the
batch it holds. At most one batch exports while the next generates.
"""

from __future__ import annotations

import os
import queue
import signal
import traceback


def main(wid: int, device: str, recipe_json: dict, base_dir: str | None, store_root: str, export_threads: int,
         threads: int, tasks, results) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["CHEXFORGE_WORKER"] = str(wid)
    import torch

    torch.set_num_threads(max(1, threads))
    from ..errors import UserError
    from .batch import BatchRunner, recipe_from_json

    try:
        runner = BatchRunner(recipe_from_json(recipe_json, base_dir), store_root, device, export_threads)
    except UserError as e:
        results.put(("fatal", wid, e.line(), True))
        return
    except Exception:  # noqa: BLE001 - reported to the parent with its traceback
        results.put(("fatal", wid, traceback.format_exc(limit=3), False))
        return
    results.put(("ready", wid))
    parent = os.getppid()
    exporting = None
    while True:
        try:
            task = tasks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # the parent was killed: stop instead of waiting forever
                break
            continue
        if task is None:
            break
        batch_id, rows, attempt, part = task
        results.put(("generating", wid, batch_id))  # if the process dies now, this batch is the culprit
        try:
            future = runner.submit(batch_id, rows, attempt, part)  # generates now, exports on a thread
        except Exception as e:  # noqa: BLE001
            results.put(("error", wid, batch_id, f"{type(e).__name__}: {e}", isinstance(e, UserError)))
            continue
        future.add_done_callback(lambda f, b=batch_id: _report(f, b, results, wid))
        if exporting is not None:
            exporting.exception()  # bound: the batch before this one has finished exporting
        exporting = future
    if exporting is not None:
        exporting.exception()
    runner.close()
    results.put(("exit", wid))


def _report(future, batch_id: int, results, wid: int) -> None:
    from ..errors import UserError

    e = future.exception()
    if e is None:
        results.put(("done", wid, future.result()))
    else:  # a write error (full disk) stops the run with one line
        text = e.line() if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        results.put(("error", wid, batch_id, text, isinstance(e, UserError)))
