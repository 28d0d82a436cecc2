"""Seeded means the same pixels on the same device, however the work is split: a job rendered with
one CPU thread equals the job rendered with two (worker processes get fewer threads each)."""

from __future__ import annotations

import numpy as np
import torch

from chexforge.contracts.vocabulary import FINDING_NAMES


def test_a_drr_image_does_not_depend_on_the_thread_count(drr64):
    job = {"job_id": "t", "cohort": "c", "seed": 7, "view": "PA", "sex": "M", "age": 60, "size": 256, "race": None,
           **{f: 0 for f in FINDING_NAMES}, "Effusion": 1}
    before = torch.get_num_threads()
    try:
        images = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            images.append(drr64.render(job).image)
    finally:
        torch.set_num_threads(before)
    # Before the display's mean was taken in float64, about 50,000 pixels differed by ~6e-7.
    assert np.array_equal(images[0], images[1])
