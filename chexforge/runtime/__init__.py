"""Running jobs: batching, export overlap, resume, progress."""

from .runner import RunOptions, RunSummary, run

__all__ = ["RunOptions", "RunSummary", "run"]
