"""One virtual patient laid out on one scene: what the renderer needs per (patient, CT, beam axis).

`Body` holds the patient's deformation as the projector applies it (project.Warp), the patient's
own attenuation volume (the scene's, with the tissue additions of tissue.py written in: breasts,
calcium, lung vessels) and the global size (the geometry's scale). Making one costs a few tens of
milliseconds and a copy of the scene's attenuation; the backend keeps the recent ones, so the
views of one study share their patient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import deform, tissue
from .geometry import Framing
from .patient import Patient
from .project import Slabs, Warp
from .scene import Scene


@dataclass
class Body:
    patient: Patient
    warp: Warp
    framing: Framing  # size relative to the CT, lungs' height range
    tissue: Slabs  # attenuation (+ bone basis density): the scene's plus this patient's additions
    reach: float  # the largest in-plane displacement (voxels): boxes are tested with this margin
    # Image size → the patient's cardiothoracic ratio on a canonical PA film (Cardiomegaly aims
    # at it in every view of a study); filled on the patient's PA body.
    frontal_ctr: dict[int, float] = field(default_factory=dict)


def make_body(patient: Patient, scene: Scene, with_vessels: bool) -> Body:
    inserter = scene.inserter
    lm = inserter.cached("landmarks", lambda: deform.landmarks(scene.phantom))
    field = deform.backward_field(patient, lm, scene.phantom)
    warp = deform.warp_for_axis(field, scene.axis, scene.phantom.shape).to(scene.device)
    adds = tissue.additions(patient, lm, scene.phantom, inserter)
    if with_vessels:
        adds += tissue.vessel_trees(patient, scene.phantom, inserter)
    volume = scene.tissue.clone()
    first, stop = volume.span or (0, volume.data.shape[0])
    for add in adds:
        box = tuple(slice(o, o + n) for o, n in zip(add.origin, add.mu.shape))
        volume.xyz(0)[box] += add.mu.to(volume.data)
        if add.bone is not None and volume.data.shape[1] > 1:
            volume.xyz(1)[box] += add.bone.to(volume.data)
        first, stop = min(first, box[scene.axis].start), max(stop, box[scene.axis].stop)  # breasts reach out
    volume.span = (first, stop)
    others = [a for a in range(3) if a != scene.axis]
    reach = float(np.abs(field[others]).max()) + 1.0
    lo, hi = scene.phantom.lung_extent_mm
    framing = Framing(deform.body_scale(patient, lm), (float(lo[2]) - deform.dome_drop(patient, lm), float(hi[2])))
    return Body(patient, warp, framing, volume, reach)
