"""`chexforge status` as a function: where a running or stopped run stands, from its heartbeat
(.run.json, progress.py) and its manifest."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..contracts import manifest as mc
from ..errors import UserError
from ..export import manifest as mf
from ..store import open_store
from .progress import alive, read_run


@dataclass
class RunStatus:
    out: str
    state: str  # running, finished, interrupted, stopped (process gone), or finished (no heartbeat kept)
    planned: int
    ok: int
    failed: int
    engine: str | None = None
    devices: list[str] = field(default_factory=list)
    started: float | None = None  # epoch seconds
    rate: float | None = None  # images/s of the run that wrote the heartbeat
    eta_seconds: float | None = None  # only while running
    errors: list[dict] = field(default_factory=list)  # the first failed jobs: job_id, error

    @property
    def left(self) -> int:
        return max(0, self.planned - self.ok - self.failed)


def run_status(out: str, errors: int = 5) -> RunStatus:
    store = open_store(out)
    info = read_run(store)
    if info is None and not store.exists(mc.MANIFEST):
        raise UserError("no run here: not a chexforge output folder", out)
    table = mf.read_manifest(store, mc.STATUS_COLUMNS)
    statuses = table.column("status").to_pylist()
    ok = sum(1 for s in statuses if s == "ok")
    failed = table.num_rows - ok
    first = [r for r in table.select(["job_id", "status", "error"]).to_pylist() if r["status"] != "ok"][:errors]
    if info is None:
        return RunStatus(str(out), "finished (no heartbeat kept)", table.num_rows, ok, failed, errors=first)
    state = info["state"]
    if state == "running" and not alive(info):
        state = "stopped (the process is gone; run the same command to resume)"
    status = RunStatus(str(out), state, info["planned"], ok, failed, info["engine"], list(info["devices"]),
                       info["started"], info["rate"], errors=first)
    if info["state"] == "running" and info["rate"] > 0 and status.left:
        status.eta_seconds = status.left / info["rate"]
    return status
