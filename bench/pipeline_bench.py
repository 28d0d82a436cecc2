"""Pipeline efficiency: how much of the wall time the device is busy, with real exports.

A simulated device (the `simulated` backend: a sleep per batch, which frees the GIL like a GPU
kernel, returning 512² images with a mask and a box) runs through the real runtime with PNG +
DICOM + mask export on. Efficiency = pure device time / wall time of the generating phase;
target >= 0.95. Then the same recipe on the Ray engine (overhead ratio against local), and peak
memory of whole runs at 10^3 and 10^5 jobs (streaming: it should not grow with the job count).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

RECIPE = """
name: pipeline-bench
seed: 1
backend: simulated
backend_options: {{seconds_per_batch: {spb}, batch_size: {bs}}}
output: {{size: {size}, formats: {formats}, masks: {masks}, coco: true}}
cohorts:
  - {{name: a, count: {n}}}
"""

CHILD = """
import json, sys, time


def peak_mb():
    # VmHWM, not ru_maxrss: the latter keeps the parent's resident size across fork + exec.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
from chexforge.recipe import load_recipe
from chexforge.runtime import RunOptions, run
from chexforge.runtime.jobs import JobSource
r = load_recipe(sys.argv[1])
jobs = JobSource.from_recipe(r)  # planned in chunks as the run goes, as `chexforge generate` does
t0 = time.perf_counter()
s = run(jobs, r, sys.argv[2], RunOptions(progress=False, engine=sys.argv[3], devices="cpu", ray_actors=1))
print(json.dumps({"wall": s.seconds, "device": s.device_seconds, "total": time.perf_counter() - t0,
                  "images": s.generated, "peak_rss_mb": peak_mb()}))
"""


def run_child(recipe: Path, out: Path, engine: str = "local") -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(recipe), str(out), engine], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write(folder: Path, name: str, **kw) -> Path:
    p = folder / name
    p.write_text(textwrap.dedent(RECIPE.format(**kw)))
    return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=160)
    ap.add_argument("--seconds-per-batch", type=float, default=0.5)
    ap.add_argument("--memory-jobs", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--skip-ray", action="store_true")
    a = ap.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        r = write(d, "eff.yaml", spb=a.seconds_per_batch, bs=8, size=512, formats="[png, dicom]", masks="true", n=a.images)
        local = run_child(r, d / "local")
        eff = local["device"] / local["wall"]
        print(f"efficiency (local, 512², PNG+DICOM+mask, {a.images} images, {a.seconds_per_batch}s device per batch of 8): "
              f"device {local['device']:.1f} s / wall {local['wall']:.1f} s = {eff:.3f} (target >= 0.95)")
        if not a.skip_ray:
            ray = run_child(r, d / "ray", "ray")
            print(f"Ray engine, same recipe: wall {ray['total']:.1f} s vs local {local['total']:.1f} s "
                  f"(overhead ratio {ray['total'] / local['total']:.2f}, including Ray start-up)")
        peaks = []
        for n in a.memory_jobs:
            m = write(d, f"mem{n}.yaml", spb=0, bs=64, size=64, formats="[png]", masks="false", n=n)
            res = run_child(m, d / f"mem{n}")
            peaks.append(res["peak_rss_mb"])
            print(f"{n:>7,} jobs (64², PNG): peak RSS {res['peak_rss_mb']:.0f} MB, {res['images'] / res['total']:.0f} images/s")
        for (n0, p0), (n1, p1) in zip(zip(a.memory_jobs, peaks), list(zip(a.memory_jobs, peaks))[1:]):
            print(f"peak memory ratio {n1:,} / {n0:,} jobs: {p1 / p0:.2f}")


if __name__ == "__main__":
    main()
