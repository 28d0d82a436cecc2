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

from dataclasses import dataclass

import torch
import torch.nn.functional as F

MASK_MM = 0.5  # a ray crossing a structure for at least this path length (mm) is inside its mask


@dataclass
class Slabs:
    """A C-channel volume stored as planes along `axis` (0 = x, 1 = y, 2 = z)."""

    data: torch.Tensor  # (P, C, D1, D2)
    axis: int

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
        return Slabs(self.data.clone(), self.axis)


def voxel_rays(vox_from_world: torch.Tensor, src: torch.Tensor, tgt: torch.Tensor):
    """Map world-frame rays into voxel index space; return (src_v (3,), tgt_v (N, 3), lengths (N,))."""
    m = vox_from_world.to(src)
    src_v = m[:3, :3] @ src + m[:3, 3]
    tgt_v = tgt @ m[:3, :3].T + m[:3, 3]
    return src_v, tgt_v, (tgt - src).norm(dim=-1)


def joseph(slabs: Slabs, src_v: torch.Tensor, tgt_v: torch.Tensor, lengths: torch.Tensor,
           max_floats: int = 1 << 25) -> torch.Tensor:
    """Line integrals (C, N) of the volume along rays from `src_v` to each `tgt_v` (voxel space).

    The integral is over the whole ray; the volume is zero outside its bounds.
    """
    vol = slabs.data
    P, C, D1, D2 = vol.shape
    j = slabs.axis
    a, b = [x for x in range(3) if x != j]
    d = (tgt_v - src_v).to(torch.float64)
    s = src_v.to(torch.float64)
    inv = 1.0 / d[:, j]
    # Crossing of plane k: coordinate = s + (k - s_j)/d_j * d, i.e. base + k * slope, normalized
    # for grid_sample (align_corners=True: index 0 -> -1, index D-1 -> +1). x indexes D2, y D1.
    norm = torch.tensor([2.0 / max(D2 - 1, 1), 2.0 / max(D1 - 1, 1)], dtype=torch.float64, device=d.device)
    slope = torch.stack([d[:, b] * inv, d[:, a] * inv], -1) * norm
    base = torch.stack([s[b] - s[j] * d[:, b] * inv, s[a] - s[j] * d[:, a] * inv], -1) * norm - 1
    slope, base = slope.to(vol.dtype), base.to(vol.dtype)
    n = tgt_v.shape[0]
    out = torch.zeros(C, n, dtype=torch.float32, device=vol.device)
    chunk = max(1, min(P, max_floats // max(1, n * (2 + C))))
    for k0 in range(0, P, chunk):
        k = torch.arange(k0, min(P, k0 + chunk), device=vol.device, dtype=vol.dtype)
        grid = torch.addcmul(base[None], k[:, None, None], slope[None]).view(len(k), n, 1, 2)
        sampled = F.grid_sample(vol[k0:k0 + len(k)], grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        out += sampled.sum(0)[..., 0].float()
    return out * (lengths * inv.abs()).float()[None]


def diffdrr_trilinear(volume_xyz: torch.Tensor, src_v: torch.Tensor, tgt_v: torch.Tensor,
                      lengths: torch.Tensor, n_points: int = 500) -> torch.Tensor:
    """The same integral with diffdrr's trilinear renderer (reference implementation), (1, N)."""
    from diffdrr.renderers import Trilinear

    img = lengths.float()[None, None]
    out = Trilinear()(volume_xyz.float(), src_v.float()[None, None], tgt_v.float()[None], img, n_points=n_points)
    return out[0]


def project(slabs: Slabs, src_v: torch.Tensor, tgt_v: torch.Tensor, lengths: torch.Tensor,
            projector: str = "joseph") -> torch.Tensor:
    """Line integrals (C, N) of every channel with the chosen projector (DRROptions.projector)."""
    if projector == "diffdrr":
        return torch.cat([diffdrr_trilinear(slabs.xyz(c), src_v, tgt_v, lengths) for c in range(slabs.data.shape[1])])
    return joseph(slabs, src_v, tgt_v, lengths)
