"""The hybrid backend: the DRR backend's virtual patient (exact masks, boxes, geometry) rendered as
texture by the diffusion backend's control branch, optionally from the DRR image itself."""
