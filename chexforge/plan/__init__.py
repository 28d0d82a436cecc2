"""Planning: recipe → deterministic job table (jobs.parquet), whole (`plan`) or as a stream of
tables (`iter_plan`, what the runtime consumes)."""

from ..contracts.jobs import read_jobs, write_jobs
from .planner import iter_plan, plan

__all__ = ["iter_plan", "plan", "read_jobs", "write_jobs"]
