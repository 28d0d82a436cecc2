"""Line integrals through a voxel volume along cone-beam rays.

`joseph` is Joseph's method (1982), the standard interpolating forward projector of CT: each
ray is stepped one voxel plane at a time along the volume axis closest to the beam, the plane
is sampled bilinearly where the ray crosses it, and each sample is weighted by the ray length
per plane. All rays' crossings of a plane are one 2-D `grid_sample` call, batched over a chunk
of planes, so the work is dense and cache-friendly: about 10-20× faster on a CPU than
sampling the volume trilinearly in 3-D, for the same integral (see tests and bench/).

`diffdrr` is diffdrr's own trilinear renderer on the same rays (the reference).

Volumes are stored plane-major, `(P, C, D1, D2)`, with P the stepping axis, so the same
tensor serves both per-job copies (findings are written into them) and the projector.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

MASK_MM = 0.5  # a ray crossing a structure for at least this path length (mm) is inside its mask


@dataclass
class Slabs:
    """A C-channel volume stored as planes along `axis` (0 = x, 1 = y, 2 = z)."""

    data: torch.Tensor  # (P, C, D1, D2)
    axis: int
    # Planes [first, stop) holding anything (the rest is air, which the projector skips); None: all.
    span: tuple[int, int] | None = None
    # Sample every `step`-th plane (weighted by `step`): for channels that only need to know
    # whether a ray crosses a structure (masks), not the exact integral.
    step: int = 1

    def with_span(self) -> Slabs:
        """The same volume, its non-empty plane range measured (worth it for volumes projected often)."""
        busy = torch.nonzero(self.data.flatten(1).abs().amax(1) > 0).flatten()
        span = (int(busy[0]), int(busy[-1]) + 1) if len(busy) else (0, 0)
        return Slabs(self.data, self.axis, span, self.step)

    @classmethod
    def from_xyz(cls, volume: torch.Tensor, axis: int) -> Slabs:
        """`volume` is (C, X, Y, Z) or (X, Y, Z)."""
        if volume.ndim == 3:
            volume = volume[None]
        others = [a for a in range(3) if a != axis]
        return cls(volume.permute(1 + axis, 0, 1 + others[0], 1 + others[1]).contiguous(), axis)

    def xyz(self, channel: int = 0) -> torch.Tensor:
        """A (X, Y, Z) *view* of one channel, for writing findings into the volume."""
        # Stored dims are (axis, others[0], others[1]); put each world axis back in place.
        others = [a for a in range(3) if a != self.axis]
        order = [0, 0, 0]
        order[others[0]], order[others[1]] = 1, 2
        return self.data[:, channel].permute(*order)

    def clone(self) -> Slabs:
        return Slabs(self.data.clone(), self.axis, self.span, self.step)


@dataclass
class Warp:
    """A smooth backward deformation of the volume, as the projector along `axis` applies it.

    The ray point at voxel index p samples the volume at p + displacement(p) (a virtual patient
    drawn from one CT, deform.py). Only the two in-plane components are kept: the projector
    steps plane by plane along `axis`, and a shift along the beam moves material along its own
    ray (a second-order change of magnification; global depth changes are in the geometry's
    scale, which rescales path lengths exactly). `field` is (P, 2, G1, G2): per plane of the
    full volume, the (b, a) displacement in voxels on a coarse grid spanning the in-plane index
    range [0, D-1] (a, b: the other two axes in order; b runs along the last stored dimension).
    """

    field: torch.Tensor
    axis: int
    extent: tuple[float, float]  # (D1 - 1, D2 - 1) of the full volume

    def to(self, device) -> Warp:
        return Warp(self.field.to(device), self.axis, self.extent)


class Rays(NamedTuple):
    """Rays in a volume's voxel space: source (3,), detector pixels (N, 3), world lengths (N,),
    and the patient's deformation (None: the CT as it is)."""

    src_v: torch.Tensor
    tgt_v: torch.Tensor
    lengths: torch.Tensor
    warp: Warp | None = None


def voxel_rays(vox_from_world: torch.Tensor, src: torch.Tensor, tgt: torch.Tensor, warp: Warp | None = None) -> Rays:
    """Map world-frame rays into voxel index space."""
    m = vox_from_world.to(src)
    src_v = m[:3, :3] @ src + m[:3, 3]
    tgt_v = tgt @ m[:3, :3].T + m[:3, 3]
    return Rays(src_v, tgt_v, (tgt - src).norm(dim=-1), warp)


SEGMENT = 8  # planes over which a warp's displacement is taken as linear along each ray


def joseph(slabs: Slabs | Sequence[Slabs], src_v: torch.Tensor, tgt_v: torch.Tensor, lengths: torch.Tensor,
           warp: Warp | None = None, origin: tuple[int, int, int] = (0, 0, 0), max_floats: int = 1 << 25) -> torch.Tensor:
    """Line integrals (C, N) of the volume along rays from `src_v` to each `tgt_v` (voxel space).

    The integral is over the whole ray; the volume is zero outside its bounds. Several volumes of
    one shape and axis (`slabs` a sequence) are sampled at the same positions and their channels
    returned in order: the positions are the costly part. `warp` deforms the volume (see Warp):
    its displacement is looked up at every SEGMENT-th plane (on global plane indices, so every
    box deforms alike) and is linear in between, which keeps each ray's sample positions linear
    in the plane index, as without a warp. `origin` is where this volume's voxel 0 lies in the
    full volume the warp was made for (a finding's or a tissue's small box).
    """
    vols = [slabs] if isinstance(slabs, Slabs) else list(slabs)
    P, _, D1, D2 = vols[0].data.shape
    C = sum(v.data.shape[1] for v in vols)
    j = vols[0].axis
    first, stop = vols[0].span or (0, P)
    device, dtype = vols[0].data.device, vols[0].data.dtype
    a, b = [x for x in range(3) if x != j]
    d = (tgt_v - src_v).to(torch.float64)
    s = src_v.to(torch.float64)
    inv = 1.0 / d[:, j]
    # Crossing of plane k: coordinate = s + (k - s_j)/d_j * d, i.e. base + k * slope, normalized
    # for grid_sample (align_corners=True: index 0 -> -1, index D-1 -> +1). x indexes D2, y D1.
    norm = torch.tensor([2.0 / max(D2 - 1, 1), 2.0 / max(D1 - 1, 1)], dtype=torch.float64, device=d.device)
    slope = torch.stack([d[:, b] * inv, d[:, a] * inv], -1) * norm
    base = torch.stack([s[b] - s[j] * d[:, b] * inv, s[a] - s[j] * d[:, a] * inv], -1) * norm - 1
    n = tgt_v.shape[0]
    out = torch.zeros(C, n, dtype=torch.float32, device=device)
    if stop <= first:
        return out
    # Per run of planes: the plane range and its (base, slope); without a warp one run.
    if warp is None:
        runs = [(first, stop, base.to(dtype), slope.to(dtype))]
    else:
        runs = _warped_runs(warp, base, slope, norm, (D1, D2), j, origin, first, stop, dtype)
    chunk = max(1, max_floats // max(1, n * (2 + C)))
    for k_first, k_stop, run_base, run_slope in runs:
        for k0 in range(k_first, k_stop, chunk):
            k = torch.arange(k0, min(k_stop, k0 + chunk), device=device, dtype=dtype)
            grid = torch.addcmul(run_base[None], k[:, None, None], run_slope[None]).view(len(k), n, 1, 2)
            c0 = 0
            for v in vols:
                if v.step == 1:
                    sampled = F.grid_sample(v.data[k0:k0 + len(k)], grid, mode="bilinear", padding_mode="zeros",
                                            align_corners=True).sum(0)
                else:  # planes whose global index is a multiple of step, weighted by it
                    pick = torch.nonzero((k.long() + origin[j]) % v.step == 0).flatten()
                    sampled = F.grid_sample(v.data[k0 + pick], grid[pick], mode="bilinear", padding_mode="zeros",
                                            align_corners=True).sum(0) * v.step
                out[c0:c0 + v.data.shape[1]] += sampled[..., 0].float()
                c0 += v.data.shape[1]
    return out * (lengths * inv.abs()).float()[None]


def _warped_runs(warp: Warp, base, slope, norm, dims, j: int, origin, first: int, stop: int, dtype):
    """Runs of at most SEGMENT planes, each with the base and slope that put its samples where
    the warp sends them: the displacement looked up at the run's two end planes (global indices
    multiple of SEGMENT) and interpolated linearly between them."""
    D1, D2 = dims
    a, b = [x for x in range(3) if x != j]
    oj = origin[j]
    full = warp.field.shape[0]
    ends = torch.arange((first + oj) // SEGMENT, (stop - 1 + oj) // SEGMENT + 2, dtype=torch.float64) * SEGMENT
    ends_g = ends.clamp(0, full - 1)
    k_ends = (ends_g - oj).to(base.device)  # local plane index of each end
    pts = base[None] + k_ends[:, None, None] * slope[None]  # (E, n, 2) normalised local
    ext = torch.tensor([max(warp.extent[1], 1.0), max(warp.extent[0], 1.0)], dtype=torch.float64, device=base.device)
    size = torch.tensor([max(D2 - 1, 1), max(D1 - 1, 1)], dtype=torch.float64, device=base.device)
    at = (pts + 1) * (size / ext) + torch.tensor([origin[b], origin[a]], dtype=torch.float64, device=base.device) / ext * 2 - 1
    field = warp.field[ends_g.long().to(warp.field.device)].to(device=base.device, dtype=torch.float32)
    disp = F.grid_sample(field, at.float().view(len(ends), -1, 1, 2), mode="bilinear", padding_mode="border",
                         align_corners=True)
    disp = disp[..., 0].transpose(1, 2) * norm.float()  # (E, n, 2), normalised units
    span = (k_ends[1:] - k_ends[:-1]).clamp_min(1.0).float()
    delta = (disp[1:] - disp[:-1]) / span[:, None, None]
    run_base = (base.float()[None] + disp[:-1] - k_ends[:-1].float()[:, None, None] * delta).to(dtype)
    run_slope = (slope.float()[None] + delta).to(dtype)
    runs = []
    for e in range(len(ends) - 1):
        k_first = max(first, int(k_ends[e]))
        k_stop = min(stop, int(ends[e + 1]) - oj)
        if k_stop > k_first:
            runs.append((k_first, k_stop, run_base[e], run_slope[e]))
    return runs


def diffdrr_trilinear(volume_xyz: torch.Tensor, src_v: torch.Tensor, tgt_v: torch.Tensor,
                      lengths: torch.Tensor, n_points: int = 500) -> torch.Tensor:
    """The same integral with diffdrr's trilinear renderer (reference implementation), (1, N)."""
    from diffdrr.renderers import Trilinear

    img = lengths.float()[None, None]
    out = Trilinear()(volume_xyz.float(), src_v.float()[None, None], tgt_v.float()[None], img, n_points=n_points)
    return out[0]


def project(slabs: Slabs | Sequence[Slabs], src_v: torch.Tensor, tgt_v: torch.Tensor, lengths: torch.Tensor,
            warp: Warp | None = None, projector: str = "joseph", origin: tuple[int, int, int] = (0, 0, 0)) -> torch.Tensor:
    """Line integrals (C, N) of every channel with the chosen projector (DRROptions.projector).

    diffdrr's renderer knows no deformation: a warped patient is always projected with joseph.
    """
    if projector == "diffdrr" and warp is None:
        vols = [slabs] if isinstance(slabs, Slabs) else list(slabs)
        return torch.cat([diffdrr_trilinear(v.xyz(c), src_v, tgt_v, lengths) for v in vols for c in range(v.data.shape[1])])
    return joseph(slabs, src_v, tgt_v, lengths, warp, origin)
