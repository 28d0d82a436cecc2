"""Running jobs: batching, device workers, export overlap, QC retries, resume, shards, Ray, status.

`generate(out, recipe=...)` is `chexforge generate`; `run(jobs, recipe, out)` runs a job table or
stream that is already in hand.
"""

from .runner import RunOptions, RunSummary, generate, open_jobs, run

__all__ = ["RunOptions", "RunSummary", "generate", "open_jobs", "run"]
