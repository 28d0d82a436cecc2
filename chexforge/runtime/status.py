"""`chexforge status` as a function: where a running or stopped run stands, from its heartbeat
(.run.json, progress.py), its lock (runtime/lock.py: a run that has not written a heartbeat
yet) and its manifest."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..contracts import manifest as mc
from ..errors import UserError
from ..export import manifest as mf
from ..store import open_store
from .lock import holder_of
from .progress import alive, read_run

STARTING = "starting"


@dataclass
class RunStatus:
    out: str
    # running, starting (no batch finished yet), finished, interrupted, stopped (process gone), or
    # finished (no heartbeat kept)
    state: str
    planned: int
    ok: int
    failed: int
    engine: str | None = None
    devices: list[str] = field(default_factory=list)
    started: float | None = None  # epoch seconds
    rate: float | None = None  # images/s of the run that wrote the heartbeat; None until one is measured
    eta_seconds: float | None = None  # only while running
    errors: list[dict] = field(default_factory=list)  # the first failed jobs: job_id, error
    writer: str | None = None  # the run holding the folder's lock: command, pid, host, start
    warnings: list[str] = field(default_factory=list)  # damaged manifest files

    @property
    def left(self) -> int:
        return max(0, self.planned - self.ok - self.failed)


def run_status(out: str, errors: int = 5) -> RunStatus:
    store = open_store(out)
    info = read_run(store)
    holder = holder_of(store)
    has_manifest = store.exists(mc.MANIFEST) or bool(mf.part_names(store))
    if info is not None and holder is not None and (info.get("pid") != holder.pid or info.get("host") != holder.host):
        info = None  # the heartbeat is an earlier run's: this one has not written its own yet
    if info is None and holder is None and not has_manifest:
        raise UserError("no run here: not a chexforge output folder", out)
    warnings: list[str] = []
    table = mf.read_manifest(store, mc.STATUS_COLUMNS, on_damaged=lambda e: warnings.append(
        f"{e.rel} is damaged: the next `chexforge generate` here moves it aside and makes its jobs again"))
    statuses = table.column("status").to_pylist()
    ok = sum(1 for s in statuses if s == "ok")
    failed = table.num_rows - ok
    first = [r for r in table.select(["job_id", "status", "error"]).to_pylist() if r["status"] != "ok"][:errors]
    writer = holder.describe() if holder is not None else None
    if info is None and holder is not None:  # the run is preparing: planning, checking the folder
        return RunStatus(str(out), f"{STARTING} (preparing the folder and the plan)", table.num_rows, ok, failed,
                         started=holder.started, errors=first, writer=writer, warnings=warnings)
    if info is None:
        return RunStatus(str(out), "finished (no heartbeat kept)", table.num_rows, ok, failed, errors=first,
                         warnings=warnings)
    state = info["state"]
    running = state == "running" and alive(info)
    if state == "running" and not running:
        state = "stopped (the process is gone; run the same command to resume)"
    reported = int(info.get("done", 0)) + int(info.get("failed", 0))
    committed = ok + failed - int(info.get("skipped", 0))  # rows this run committed (the heartbeat lags)
    rate = info["rate"]
    if running and reported == 0:
        rate = None  # nothing measured yet
        if committed <= 0:
            state = f"{STARTING} (no batch finished yet)"
    status = RunStatus(str(out), state, info["planned"], ok, failed, info["engine"], list(info["devices"]),
                       info["started"], rate, errors=first, writer=writer, warnings=warnings)
    if running and rate and status.left:
        status.eta_seconds = status.left / rate
    return status
