"""Noise schedules: the training schedule and the samplers.

Training follows PixArt/ChexGen: 1000 steps, linear betas 1e-4 → 0.02, epsilon prediction,
learned variance when the transformer has 8 output channels. Sampling:
- `dpm++`: DPM-Solver++ (2nd order multistep), the default, about 20 steps;
- `ddpm`: ancestral DDPM through diffusers (with the learned variance when there is one), 100 steps;
- `chexgen`: ChexGen's own sampler (tools/sample.py), reproduced exactly: IDDPM ancestral sampling
  on a respaced 100-step schedule (`RespacedDDPM` below) plus the guidance quirks that
  `ChexforgePipeline.sample` applies for this preset (docs/diffusion.md, "Sampling presets").
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

SAMPLERS = ("dpm++", "ddpm", "chexgen")
DEFAULT_STEPS = {"dpm++": 20, "ddpm": 100, "chexgen": 100}


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
    if name == "chexgen":
        return RespacedDDPM(train_config)
    raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}")


def uses_variance(sched) -> bool:
    """Whether the sampler wants the learned-variance channels next to the noise prediction."""
    if isinstance(sched, RespacedDDPM):
        return sched.learned
    return isinstance(sched, DDPMScheduler) and sched.config.variance_type in ("learned", "learned_range")


def space_timesteps(num_timesteps: int, count: int) -> list[int]:
    """The training steps a `count`-step respaced sampler visits, ascending: IDDPM's rule for one
    section (a float stride (T-1)/(count-1) accumulated from 0 and rounded with Python's round).
    Written out rather than taken from np.linspace: the accumulated stride and linspace can round a
    .5 differently for some counts, and this is the rule ChexGen's `create_diffusion("100")` uses."""
    if not 1 <= count <= num_timesteps:
        raise ValueError(f"cannot take {count} steps out of {num_timesteps}")
    stride = 1 if count <= 1 else (num_timesteps - 1) / (count - 1)
    taken, cur = [], 0.0
    for _ in range(count):
        taken.append(round(cur))
        cur += stride
    return sorted(set(taken))


class RespacedDDPM:
    """Ancestral sampling of Improved DDPM on a respaced schedule, as ChexGen samples (its
    `create_diffusion(str(steps))`: linear betas, epsilon prediction, learned-range variance).

    Respacing keeps the training schedule's cumulative alphas at the visited steps t_0 < ... < t_K
    and derives new betas 1 - ᾱ(t_k)/ᾱ(t_{k-1}); the model is called with the original step
    number. Tables are float64 and cast to float32 where they meet a tensor, as IDDPM does.
    Variance per step k (k = 0 is the last step, which adds no noise):
    - learned range (8-channel models): log σ² = f·log β_k + (1-f)·log β̃_k with f = (v+1)/2 from
      the model's variance channels; β̃ is the posterior variance, its k = 0 entry replaced by
      k = 1's ("clipped": it is 0 there);
    - otherwise IDDPM's "fixed large" (β_k, k = 0 replaced by β̃_1), what `create_diffusion`
      gives a model without learned variance.
    The interface is the part of diffusers' schedulers that the pipeline uses.
    """

    order = 1
    init_noise_sigma = 1.0

    def __init__(self, train_config: dict):
        cfg = dict(train_config)
        if cfg.get("prediction_type", "epsilon") != "epsilon":
            raise ValueError("the chexgen sampler needs an epsilon-prediction model")
        n = int(cfg.get("num_train_timesteps", 1000))
        if cfg.get("trained_betas") is not None:
            betas = np.asarray(cfg["trained_betas"], dtype=np.float64)
        elif cfg.get("beta_schedule", "linear") == "linear":
            betas = np.linspace(cfg.get("beta_start", 1e-4), cfg.get("beta_end", 0.02), n, dtype=np.float64)
        else:
            raise ValueError(f"the chexgen sampler knows the linear beta schedule, not {cfg.get('beta_schedule')!r}")
        self.alphas_cumprod = np.cumprod(1.0 - betas)  # of the training schedule (float64)
        self.learned = cfg.get("variance_type") in ("learned", "learned_range")
        self.set_timesteps(100)

    def set_timesteps(self, steps: int, device: str | torch.device | None = None) -> None:
        use = space_timesteps(len(self.alphas_cumprod), steps)
        acp = self.alphas_cumprod[use]
        prev = np.append(1.0, acp[:-1])
        betas = 1.0 - acp / prev
        post_var = betas * (1.0 - prev) / (1.0 - acp)
        min_log = np.log(np.append(post_var[1], post_var[1:])) if len(use) > 1 else np.log(np.maximum(post_var, 1e-20))
        max_log = np.log(betas) if self.learned else np.log(np.append(post_var[1], betas[1:]) if len(use) > 1 else betas)
        self._tables = {
            "recip": np.sqrt(1.0 / acp), "recipm1": np.sqrt(1.0 / acp - 1.0),
            "coef_x0": betas * np.sqrt(prev) / (1.0 - acp), "coef_xt": (1.0 - prev) * np.sqrt(1.0 - betas) / (1.0 - acp),
            "min_log": min_log, "max_log": max_log,
        }
        self._index = {t: k for k, t in enumerate(use)}
        self.timesteps = torch.tensor(use[::-1], dtype=torch.long, device=device)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def _at(self, name: str, k: int, like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self._tables[name][k], dtype=torch.float64).float().to(like.device)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None, return_dict: bool = False):
        """x_{t_{k-1}} from x_{t_k}: the posterior mean around the predicted x_0 plus, except at the
        last step, σ·noise with one draw per row from that row's generator."""
        k = self._index[int(timestep)]
        c = sample.shape[1]
        eps = model_output[:, :c].float()
        x0 = self._at("recip", k, sample) * sample - self._at("recipm1", k, sample) * eps
        mean = self._at("coef_x0", k, sample) * x0 + self._at("coef_xt", k, sample) * sample
        if k == 0:
            return (mean,)
        if self.learned:
            frac = (model_output[:, c:].float() + 1) / 2
            log_var = frac * self._at("max_log", k, sample) + (1 - frac) * self._at("min_log", k, sample)
        else:
            log_var = self._at("max_log", k, sample).expand_as(sample)
        gens = generator if isinstance(generator, list) else [generator] * len(sample)
        noise = torch.stack([torch.randn(sample.shape[1:], generator=g, dtype=torch.float32) for g in gens]).to(sample.device)
        return (mean + torch.exp(0.5 * log_var) * noise,)

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0) at training steps `timesteps` (one per row), for partial denoising."""
        acp = torch.tensor(self.alphas_cumprod, dtype=torch.float64)[timesteps.cpu().long()].float().to(original.device)
        acp = acp.reshape(-1, *([1] * (original.ndim - 1)))
        return acp.sqrt() * original + (1 - acp).sqrt() * noise
