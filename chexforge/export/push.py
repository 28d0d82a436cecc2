"""`chexforge push OUT --to HOST:PORT --aet AET` as a function: C-STORE a dataset's DICOM files
(each ok image's DX file and, with `seg`, its SEG) to a PACS or any storage SCP, with pynetdicom.

Resumable per destination: every file the peer confirms is appended to a small state file inside
the output folder, `.push/<AET>@<host>_<port>.txt` (one path relative to OUT a line), and the file
is flushed and fsynced before the next is sent, so a kill at any instant loses at most the file in
flight (sent again next time: the same SOP instance UID, which a PACS takes as the same object).
A re-run sends only what is not in the state file; `again` sends everything.

Confirmed means a C-STORE response with status Success (0x0000) or one of the warnings with which
the peer says it stored the object (PS3.4 C.4.2.1.4 and Annex GG: 0xB000 coercion of data
elements, 0xB006 elements discarded, 0xB007 data set does not match the SOP class); a failure
status is reported with its code and the file is tried again on the next run.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..contracts import manifest as mc
from ..errors import UserError
from ..store import open_store
from . import manifest as mf

STATE_DIR = ".push"
STORED_WITH_WARNING = (0xB000, 0xB006, 0xB007)
SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.1.1": "DX Image Storage - For Presentation",
               "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation Storage"}


@dataclass
class PushReport:
    destination: str  # "AET@host:port"
    state: str  # the state file, relative to OUT
    total: int = 0  # files this push was asked to deliver
    sent: int = 0  # confirmed by the peer in this run
    already: int = 0  # confirmed in an earlier run (the state file), not sent again
    warnings: list[str] = field(default_factory=list)  # "path: status 0xB000" (stored, with a warning)
    failed: list[str] = field(default_factory=list)  # "path: status 0xA700 (...)" or why it was not sent


def parse_destination(to: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 host in brackets: [::1]:104) → (host, port)."""
    m = re.fullmatch(r"\[?([^\[\]]+?)\]?:(\d{1,5})", to.strip())
    if m is None or not 0 < int(m.group(2)) < 65536:
        raise UserError(f"--to {to!r}: expected HOST:PORT, e.g. pacs.example.org:104", "push")
    return m.group(1), int(m.group(2))


def check_aet(title: str, flag: str) -> str:
    """An AE title: 1-16 characters of the default repertoire, no backslash, not only spaces."""
    if not title.strip() or len(title) > 16 or "\\" in title or not title.isascii() or not title.isprintable():
        raise UserError(f"{flag} {title!r}: expected an AE title of 1-16 printable ASCII characters", "push")
    return title


def state_name(aet: str, host: str, port: int) -> str:
    safe = lambda s: re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_") or "_"  # noqa: E731
    return f"{STATE_DIR}/{safe(aet)}@{safe(host)}_{port}.txt"


def files_to_push(out: str, seg: bool = True) -> list[str]:
    """The DICOM files of every ok image (DX, then its SEG), paths relative to `out`, in
    manifest order."""
    store = open_store(out)
    if not store.exists(mc.MANIFEST) and not mf.part_names(store):
        raise UserError("no manifest.parquet: not a chexforge output folder", out)
    table = mf.read_manifest(store, ["job_id", "status", "image_dicom", "seg_dicom"], on_damaged=lambda e: None)
    files = []
    for row in table.to_pylist():
        if row["status"] == "ok" and row["image_dicom"]:
            files.append(row["image_dicom"])
            if seg and row["seg_dicom"]:
                files.append(row["seg_dicom"])
    if not files:
        raise UserError("the manifest names no DICOM files (output.formats needs dicom)", out)
    return files


def push(out: str, to: str, aet: str, calling_aet: str = "CHEXFORGE", seg: bool = True, again: bool = False,
         progress: Callable[[int, int], None] | None = None, timeout: float = 30.0) -> PushReport:
    """Send the dataset in `out` to the storage SCP `aet` at `to` (HOST:PORT); see the module doc.
    `progress(done, total)` is called after each file. An association that cannot be made is a
    UserError (one line: what was tried and why it failed)."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE

    host, port = parse_destination(to)
    check_aet(aet, "--aet")
    check_aet(calling_aet, "--calling-aet")
    root = open_store(out).local_path("")
    if root is None:
        raise UserError("push reads a local output folder (copy it here first)", out)
    files = files_to_push(out, seg)
    rel_state = state_name(aet, host, port)
    report = PushReport(f"{aet}@{host}:{port}", rel_state, total=len(files))
    state_path = Path(root) / rel_state
    done = set() if again else _confirmed(state_path)
    todo = [f for f in files if f not in done]
    report.already = len(files) - len(todo)
    if not todo:
        if progress:
            progress(report.already, report.total)
        return report
    # Reach the port first: pynetdicom reports a refused connection as an aborted association,
    # and the person needs to know which of the two happened.
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise UserError(f"cannot reach {host}:{port} ({e.strerror or e}): is the PACS running there?", "push") from None

    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    for sop in SOP_CLASSES:  # the files are Explicit VR LE; a peer that knows only Implicit gets it re-encoded
        ae.add_requested_context(sop, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(host, port, ae_title=aet)
    if not assoc.is_established:
        why = ("the peer rejected the association (is the called AE title right, and does it accept "
               f"{calling_aet!r}?)" if assoc.is_rejected else
               "the peer aborted the association" if assoc.is_aborted else
               "no DICOM peer answered there (wrong host or port, or it is not running)")
        raise UserError(f"cannot associate with {aet} at {host}:{port}: {why}", "push")
    if progress:  # first told once the peer has accepted: a refusal prints its one line, no bar
        progress(report.already, report.total)
    state_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(state_path, "a", encoding="utf-8") as state:
            if state.tell() and not state_path.read_bytes().endswith(b"\n"):
                state.write("\n")  # end a line a kill cut short, so the next path starts its own
            for i, rel in enumerate(todo):
                if not assoc.is_established:
                    report.failed += [f"{r}: not sent, the peer closed the association" for r in todo[i:]]
                    break
                # Read, not sent as raw file bytes: pynetdicom then encodes it in whichever transfer
                # syntax the peer accepted.
                try:
                    dataset = dcmread(Path(root) / rel)
                except (OSError, InvalidDicomError) as e:
                    report.failed.append(f"{rel}: not sent, it does not read ({e}); run chexforge verify")
                    if progress:
                        progress(report.already + i + 1, report.total)
                    continue
                status = assoc.send_c_store(dataset, msg_id=i % 65535 + 1)
                code = int(status.Status) if "Status" in status else None
                if code == 0x0000 or code in STORED_WITH_WARNING:
                    state.write(rel + "\n")
                    state.flush()
                    os.fsync(state.fileno())  # confirmed stays confirmed across a crash
                    report.sent += 1
                    if code:
                        report.warnings.append(f"{rel}: status 0x{code:04X}")
                elif code is None:
                    report.failed.append(f"{rel}: no response from the peer (timed out or the association was lost)")
                else:
                    comment = str(status.get("ErrorComment", "") or "").strip()
                    report.failed.append(f"{rel}: status 0x{code:04X}" + (f" ({comment})" if comment else ""))
                if progress:
                    progress(report.already + i + 1, report.total)
    finally:
        if assoc.is_established:
            assoc.release()
    return report


def _confirmed(path: Path) -> set[str]:
    """The paths a state file lists. A last line without its newline is a write a kill cut
    short: not counted."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return set()
    lines = text.split("\n")
    return {line for line in lines[:-1] if line}


__all__ = ["PushReport", "files_to_push", "parse_destination", "push", "state_name"]
