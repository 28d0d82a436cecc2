"""Peak memory (VmHWM) of `chexforge plan --out` and `generate --dry-run`, streamed against the
whole-table way they worked before, at 10^6 jobs (and 10^5, to see the growth).

    python bench/plan_memory.py [--jobs 1000000,100000]

Each measurement is a fresh Python process that does one thing and reports its own VmHWM
(Linux /proc), so imports are counted the same on both sides:

- baseline: import what the runs below import (pyarrow, pandas, torch through the runtime) and
  read the recipe, nothing else;
- plan, whole (before): `plan(recipe)` → one table, `cohort_summary` and `estimate_seconds` of it,
  `write_jobs` (what the plan command did);
- plan, streamed (now): `plan_report(recipe, out)` (`iter_plan` chunks → the streaming tally and
  the Parquet writer, a row group at a time; the job ids kept to prove them unique);
- dry run, whole (before): `JobSource.from_recipe(r)` chunks concatenated into one table, then its
  summary (what `JobSource.table()` did for `generate --dry-run`);
- dry run, streamed (now): `runtime.runner.dry_run(recipe)`.

The streamed jobs.parquet is checked to be byte-identical to the whole one.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402
from plan_bench import RECIPE as PLAN_BENCH_RECIPE  # noqa: E402

# The planner benchmark's recipe (one large cohort, four findings, race, ages) and a small second
# cohort, so a plan always crosses a cohort boundary.
RECIPE = PLAN_BENCH_RECIPE + """  - name: small
    count: 1000
"""

CHILD = {
    "baseline": """
import chexforge.plan, chexforge.runtime.runner  # every module the four runs import
from chexforge.recipe import load_recipe
r = load_recipe(RECIPE)
""",
    "plan-whole": """
from chexforge.contracts.jobs import write_jobs
from chexforge.plan import plan
from chexforge.plan.summary import cohort_summary, estimate_seconds
from chexforge.recipe import load_recipe
r = load_recipe(RECIPE)
jobs = plan(r)
rows, secs = cohort_summary(jobs), estimate_seconds(jobs, r.backend)
write_jobs(jobs, OUT)
""",
    "plan-streamed": """
from chexforge.plan import plan_report
report = plan_report(RECIPE, OUT)
""",
    "dry-whole": """
import pyarrow as pa
from chexforge.plan.summary import cohort_summary, estimate_seconds
from chexforge.recipe import load_recipe
from chexforge.runtime.jobs import JobSource
r = load_recipe(RECIPE)
table = pa.concat_tables(list(JobSource.from_recipe(r).chunks()))
rows, secs = cohort_summary(table), estimate_seconds(table, r.backend)
""",
    "dry-streamed": """
from chexforge.runtime.runner import dry_run
report = dry_run(RECIPE)
""",
}

FOOTER = """
hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]
print('VmHWM', hwm)
"""


def measure(kind: str, recipe: Path, out: Path) -> tuple[float, float]:
    """(peak MiB, seconds) of one child process."""
    code = f"RECIPE = {str(recipe)!r}\nOUT = {str(out)!r}\n" + CHILD[kind] + FOOTER
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{kind}: {proc.stderr}")
    return int(proc.stdout.rsplit("VmHWM", 1)[1]) / 1024, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", default="100000,1000000", help="comma list of job counts (the big cohort; +1000)")
    ap.add_argument("--streamed-only", action="store_true", help="skip the whole-table runs (for 10^7 jobs and up)")
    args = ap.parse_args()
    if not Path("/proc/self/status").exists():
        sys.exit("needs Linux /proc to read VmHWM")
    print(machine())
    print(f"{'jobs':>10}  {'what':<16} {'peak MiB':>9} {'above baseline':>15} {'seconds':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for n in (int(x) for x in args.jobs.split(",")):
            recipe = tmp / f"r{n}.yaml"
            recipe.write_text(RECIPE.format(n=n))
            base, _ = measure("baseline", recipe, tmp / "none")
            print(f"{n + 1000:>10,}  {'baseline':<16} {base:>9.0f} {'':>15} {'':>8}")
            kinds = ("plan-streamed", "dry-streamed") if args.streamed_only else \
                ("plan-whole", "plan-streamed", "dry-whole", "dry-streamed")
            for kind in kinds:
                peak, secs = measure(kind, recipe, tmp / f"{kind}.parquet")
                print(f"{n + 1000:>10,}  {kind:<16} {peak:>9.0f} {peak - base:>15.0f} {secs:>8.1f}")
            if args.streamed_only:
                continue
            whole, streamed = (hashlib.sha256((tmp / f"{k}.parquet").read_bytes()).hexdigest()
                               for k in ("plan-whole", "plan-streamed"))
            print(f"{'':>10}  jobs.parquet streamed == whole: {whole == streamed}")


if __name__ == "__main__":
    main()
