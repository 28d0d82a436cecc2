"""The guided latent diffusion backend (ChexGen-style DiT with control branch, or any diffusers text-to-image pipeline)."""
