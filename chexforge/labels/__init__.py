"""Real label files (CheXpert, MIMIC-CXR, NIH ChestX-ray14, PadChest) and chexforge manifests,
read into one tidy table: one row per image with sex, age, race, view and a float column per finding.

Used by balance (audits and top-ups), priors (statistics from public label sets), evaluate
(reference sets) and training (labelled images).
"""

from .readers import read_labels

__all__ = ["read_labels"]
