"""A simulated device for benchmarks and fault tests: it sleeps like a GPU and returns images with masks."""
