"""Planning: recipe → deterministic job table (jobs.parquet)."""

from ..contracts.jobs import read_jobs, write_jobs
from .planner import plan

__all__ = ["plan", "read_jobs", "write_jobs"]
