"""Evaluation of a generated dataset: fidelity (FID/KID, precision/recall/density/coverage),
diversity (MS-SSIM), memorization screening, adherence, QC and the visual report.

`chexforge eval` runs `run.evaluate`; each metric lives in its own module and works on plain
arrays, so each is testable alone. Nothing here changes a dataset in place.
"""
