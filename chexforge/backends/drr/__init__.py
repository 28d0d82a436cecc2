"""The DRR backend: radiographs projected from a real chest CT, with findings inserted in 3-D."""
