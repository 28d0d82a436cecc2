"""Noise schedules: the training schedule and the two samplers.

Training follows PixArt/ChexGen: 1000 steps, linear betas 1e-4 → 0.02, epsilon prediction,
learned variance when the transformer has 8 output channels. Sampling:
- `dpm++`: DPM-Solver++ (2nd order multistep), the default, about 20 steps;
- `ddpm`: ancestral DDPM (with the learned variance when there is one), ChexGen's 100-step sampler.
"""

from __future__ import annotations

from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

SAMPLERS = ("dpm++", "ddpm")
DEFAULT_STEPS = {"dpm++": 20, "ddpm": 100}


def train_scheduler(learn_sigma: bool) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                         prediction_type="epsilon", clip_sample=False,
                         variance_type="learned_range" if learn_sigma else "fixed_small")


SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                 "prediction_type", "variance_type")


def sampler(name: str, train_config: dict):
    """A sampler on the training schedule. Only the schedule's own numbers are carried over and the
    step spacing is explicit ("linspace": evenly from the last training step to the first, as
    respaced IDDPM samplers do), so a saved and reloaded model samples exactly like the original."""
    schedule = {k: train_config[k] for k in SCHEDULE_KEYS if k in train_config}
    if name == "dpm++":
        # DPM-Solver++ is deterministic and takes the noise prediction alone (see uses_variance).
        schedule.pop("variance_type", None)
        return DPMSolverMultistepScheduler(**schedule, algorithm_type="dpmsolver++", solver_order=2,
                                           lower_order_final=True, timestep_spacing="linspace")
    if name == "ddpm":
        return DDPMScheduler(**schedule, clip_sample=False, timestep_spacing="linspace")
    raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}")


def uses_variance(sched) -> bool:
    """Whether the sampler wants the learned-variance channels next to the noise prediction."""
    return isinstance(sched, DDPMScheduler) and sched.config.variance_type in ("learned", "learned_range")
