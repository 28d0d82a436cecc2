"""Options of the diffusion backend (`backend_options:`). Pure pydantic: no torch here."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# Options marked SPEED change how fast or in how much memory images are made, not their pixels
# (each job has its own generator: its noise does not depend on its batch). They are left out of
# the hashed identity of job ids and seeds (contracts.backends.BackendInfo.identity_options), so
# a dataset can be resumed with another batch size.
SPEED = {"pixels": False}


class DiffusionOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sampler: Literal["dpm++", "ddpm", "chexgen"] | None = Field(
        None, description="default: the model's (dpm++; chexgen for imported ChexGen checkpoints). dpm++: DPM-Solver++ "
        "(fast); ddpm: ancestral DDPM; chexgen: ChexGen's own sampler exactly (100 respaced IDDPM steps, its guidance quirks)")
    steps: int | None = Field(None, ge=1, le=1000, description="denoising steps (default 20 for dpm++, 100 for ddpm and chexgen)")
    guidance_text: float | None = Field(None, ge=0, le=50, description="classifier-free guidance on the text (default: the model's, 4.0)")
    guidance_control: float | None = Field(None, ge=0, le=50, description="guidance on the mask/box control image (1.0 = plain conditioning)")
    control_strength: float = Field(1.0, ge=0, le=4, description="scale of the control branch's residuals")
    prefix: Literal["chexgen", "none"] | None = Field(None, description="demographics as a text prefix (default: the model's)")
    dtype: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on GPU, fp32 on CPU")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'")
    batch_size: int = Field(8, ge=1, le=1024, json_schema_extra=SPEED)
    compile: bool = Field(False, description="torch.compile the transformer", json_schema_extra=SPEED)
    fused_qkv: bool = Field(False, description="fuse the attention q/k/v projections", json_schema_extra=SPEED)
    vae_slice: int = Field(4, ge=1, le=256, description="images decoded by the VAE at a time (bounds memory)",
                          json_schema_extra=SPEED)
