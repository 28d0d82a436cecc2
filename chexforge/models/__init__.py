"""Diffusion model code: transformer, control branch, text encoders, VAE, schedulers, pipeline, training, converters."""
