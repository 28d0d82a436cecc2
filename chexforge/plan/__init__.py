"""Planning: recipe → deterministic job table (jobs.parquet), whole (`plan`) or as a stream of
tables (`iter_plan`, what the runtime consumes); `plan_report` is `chexforge plan`: the summary
and jobs.parquet, streamed chunk by chunk."""

from ..contracts.jobs import read_jobs, write_jobs
from .planner import PlanReport, iter_plan, plan, plan_report, summarise

__all__ = ["PlanReport", "iter_plan", "plan", "plan_report", "read_jobs", "summarise", "write_jobs"]
