"""Virtual patients: the anatomy of one person, drawn from a seed and conditioned on sex and age.

The DRR backend renders real chest CTs; a `Patient` says how this person differs from the CT's
own: body size and shape, lungs and diaphragm, heart, mediastinum, spine, shoulders, breasts,
body fat, bone density, calcification and the lung vessel tree. deform.py turns the shape
parameters into a smooth 3-D deformation of the CT and its labels together (so masks stay
exact); tissue.py adds what a deformation cannot make (breasts, calcium, vessels, bone density).

Everything is drawn from the patient's own seed (a job's `patient_seed`: every view of one study
shows the same person) with a numpy Generator, in a fixed order, so a patient is the same on any
worker, shard or resume. Absolute sizes are drawn (e.g. the thoracic width of a 70-year-old
woman) and turned into factors relative to the CT's own measurements (deform.Landmarks), so a CT
library's subjects are each varied toward the drawn person.

Means and spreads, and where they come from (docs/drr.md, "Virtual patients", lists them):
- stature: US adults, men 175.3 ± 7.5 cm, women 161.3 ± 7.1 cm (CDC anthropometric reference
  data 2015-2018, Fryar et al. 2021), losing about 0.1 cm a year after 40 and 0.2 after 65
  (Sorkin, Muller & Andres 1999, Baltimore Longitudinal Study of Aging);
- BMI: men 29.1, women 29.6 kg/m² (same CDC tables), SD ~6; it rises to the sixties and falls after;
- thoracic width (inner rib to inner rib, PA film): men 29.7 ± 2.7, women 27.1 ± 2.6 cm (Pan Afr
  Med J 2017;27:201), i.e. /1.08 magnification at the patient;
- thoracic depth/width ratio ~0.70, rising with age (the barrel chest of the elderly);
- lung height apex → dome: 0.93 × the upright CT's (ct.UPRIGHT_HEIGHT_MM, from West Afr J Med
  2007), ±9 % for the breath held, +12 % from 40 to 85 years (loss of elastic recoil flattens and
  lowers the diaphragm); the right dome higher than the left by about half an interspace,
  15 ± 10 mm (Felson's Principles of Chest Roentgenology);
- cardiothoracic ratio: men 0.437, women 0.452 at 40 (so that all adults average the published
  0.462 and 0.472), SD 0.04, +0.012 per decade after 40 (see
  docs/drr.md for the sources), with a heart shift of 4 mm SD (at most 8) and a rotation of the
  cardiac axis of ±4° (more horizontal with age and body fat);
- aortic knob: unfolding of the aorta moves the arch left and up with age, 0 → ~20 mm at 85
  (the knob's width grows from ~3 to ~4-4.5 cm), and the upper mediastinum widens (+18 %);
- thoracic kyphosis: Cobb angle ~27° at 20-29 rising to ~40° at 70-79, women more (Fon, Pitt &
  Thies, AJR 1980;134:979); scoliosis: Cobb ≥ 10° in up to 68 % over 60 (Schwab et al., Spine
  2005;30:1082), mild below;
- bone mineral density: peak at 20-30, then falling 0.25 %/year in men (0.55 %/year after 50) and
  0.8 %/year in women after 50: about -24 % and -28 % at 85, as NHANES III's femoral neck
  (Looker et al., Osteoporos Int 1998;8:468), SD ~12 %;
- costal-cartilage calcification: rising with age from the twenties; marginal (upper and lower
  borders) in men, central in women (Navani, Shah & Levy, AJR 1970;108:771);
- aortic-knob calcification: rising steeply after 50 (Iribarren et al., JAMA 2000;283:2810);
- breast volume (women): log-normal, median 450 ml per breast, growing with BMI, more ptotic
  with age.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

PATIENT_VERSION = 1  # bump when the drawing changes: every patient changes with it


@dataclass(frozen=True)
class Patient:
    sex: str  # "F" / "M"
    age: float
    stature_cm: float
    bmi: float
    thorax_width_cm: float  # inner rib-to-rib width at the patient (not magnified)
    depth_ratio: float  # thoracic depth / width
    lung_height_factor: float  # apex → dome, relative to the upright CT's (stature-scaled)
    dome_step_mm: float  # right dome above the left
    ctr: float  # cardiothoracic ratio aimed at (frontal, patient plane)
    heart_shift_mm: float  # toward the patient's left (+)
    heart_rotation_deg: float  # cardiac axis, frontal plane (+: more horizontal)
    aortic_unfolding_mm: float  # arch moved left/up
    mediastinum_factor: float  # upper mediastinal width
    kyphosis_deg: float
    scoliosis_mm: float  # lateral deviation of the mid-thoracic spine (+: toward the right)
    shoulder_raise_mm: float
    scapula_out_mm: float  # scapulae rotated out of the lung fields (positioning)
    chest_wall_mm: float  # extra soft tissue (fat + muscle) over the lateral chest wall
    breast_ml: float  # per breast (0 for men)
    breast_ptosis: float  # 0 (high, round) .. 1 (low, pendulous)
    bone_density: float  # relative to a young adult of the same sex
    cartilage_calcification: float  # fraction of costal cartilage calcified
    aortic_calcification: float  # extent of the arch wall calcified (0 = none)
    vessel_seed: int

    def as_meta(self) -> dict:
        d = asdict(self)
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in d.items()}


def draw_patient(sex: str | None, age: float | None, seed: int) -> Patient:
    """The person behind one job (or one study): deterministic in (sex, age, seed)."""
    rng = np.random.default_rng([int(seed) & 0xFFFF_FFFF_FFFF_FFFF, PATIENT_VERSION])
    female = sex == "F"
    age = float(60 if age is None else age)
    z = rng.standard_normal(24)  # one draw per parameter, in a fixed order
    old = np.clip((age - 40) / 45, 0, 1)  # 0 up to 40, 1 at 85

    shrink = 0.1 * max(0.0, age - 40) + 0.1 * max(0.0, age - 65)
    stature = (161.3 if female else 175.3) + (7.1 if female else 7.5) * z[0] - shrink
    bmi_mean = (28.5 if female else 28.0) + 2.0 * np.sin(np.pi * np.clip((age - 20) / 80, 0, 1))
    bmi = float(np.clip(bmi_mean * np.exp(0.18 * z[1]), 16.5, 55))
    # Thoracic width: film means /1.08 magnification; taller and heavier people are wider.
    width = ((27.1 if female else 29.7) / 1.08 + 1.6 * z[2] + 0.08 * (bmi - 28)
             + 0.04 * (stature - (161.3 if female else 175.3)))  # SD ~2.4 cm at the patient, as published
    depth_ratio = 0.68 + 0.06 * old + 0.002 * (bmi - 28) + 0.035 * z[3]
    # Films vary in the breath held (9-11 posterior ribs above the dome); the diaphragm descends with age.
    lung_height = (0.93 + 0.12 * old) * (1 + 0.09 * z[4])
    dome_step = 15 + 10 * z[5]
    ctr = (0.452 if female else 0.437) + 0.012 * max(0.0, age - 40) / 10 + 0.04 * z[6] + 0.002 * (bmi - 28)
    heart_rot = 4 * z[8] + 4 * old + 0.2 * (bmi - 28)
    kyphosis = 27 + 14 * old * (1.3 if female else 1.0) + 7 * z[11]
    # Scoliosis: mild in most adults; with age a growing share has a curve of a few cm.
    curve = rng.random() < 0.08 + 0.5 * old
    scoliosis = (z[12] * (5 + 7 * old) if curve else 2.0 * z[12])
    # Bone density: women lose faster after the menopause.
    loss = (0.008 if female else 0.003) * max(0.0, age - 50) + (0.0025 * max(0.0, age - 30) if not female else 0.0)
    bone = float(np.clip((1 - loss) * (1 + 0.12 * z[17]), 0.45, 1.4))
    cartilage = float(np.clip(((age - 20) / 60) ** 1.5 * np.exp(0.5 * z[18]), 0, 1)) if age > 20 else 0.0
    p_aortic = np.clip((age - 45) / 45, 0, 1) ** 1.5 * 0.6
    aortic = float(np.clip(0.5 + 0.25 * z[19], 0.1, 1)) if rng.random() < p_aortic else 0.0
    breast = float(450 * np.exp(0.45 * z[20]) * (bmi / 28) ** 1.3) if female else 0.0
    ptosis = float(np.clip(0.3 + 0.5 * old + 0.008 * (bmi - 28) * 10 + 0.15 * z[21], 0, 1)) if female else 0.0
    return Patient(
        sex="F" if female else "M", age=age, stature_cm=float(stature), bmi=bmi,
        thorax_width_cm=float(width), depth_ratio=float(np.clip(depth_ratio, 0.55, 0.9)),
        lung_height_factor=float(np.clip(lung_height, 0.72, 1.25)), dome_step_mm=float(np.clip(dome_step, -15, 45)),
        ctr=float(np.clip(ctr, 0.36, 0.52)), heart_shift_mm=float(np.clip(4 * z[7], -8, 8)), heart_rotation_deg=float(heart_rot),
        aortic_unfolding_mm=float(max(0.0, 20 * old + 3 * z[9])),
        mediastinum_factor=float(np.clip(1 + 0.18 * old + 0.004 * (bmi - 28) + 0.05 * z[10], 0.85, 1.4)),
        kyphosis_deg=float(np.clip(kyphosis, 10, 75)), scoliosis_mm=float(np.clip(scoliosis, -30, 30)),
        shoulder_raise_mm=float(10 * z[13]), scapula_out_mm=float(12 * z[14]),
        chest_wall_mm=float(np.clip(1.6 * (bmi - 22) + (6 if not female else 0) + 4 * z[15], 0, 60)),
        breast_ml=breast, breast_ptosis=ptosis, bone_density=bone, cartilage_calcification=cartilage,
        aortic_calcification=aortic, vessel_seed=int(rng.integers(1 << 62)),
    )
