"""Seeded draws for planning: job i's values depend only on (cohort key, i), never on the count.

No global RNG state is used anywhere in planning, so job 17 of a cohort is the same job
whether the cohort asks for 20 or 20,000 images, and raising a count only adds jobs.

- `bits`/`uniform`: counter-based hashing (splitmix64, Steele et al. 2014, vectorised over
  numpy uint64; its wrap-around multiply is what we want), for ids and seeds.
- `Streams`: scrambled Sobol' points, one dimension per named attribute, for demographics and
  findings. A Sobol' sequence is extensible and every prefix is evenly spread, so a cohort of
  4 at 50 % female gets 2 women, not "4 with probability 1/16", while staying random.
"""

from __future__ import annotations

import hashlib

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64, copy=True) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def key_of(*parts: object) -> int:
    """A 64-bit key from any strings/numbers (stable across platforms and runs)."""
    blob = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "little")


def bits(key: int, index: np.ndarray, stream: int | str) -> np.ndarray:
    """64 random bits per index for one named stream."""
    stream_key = np.array([key_of(key, stream)], dtype=np.uint64)
    return splitmix64(splitmix64(index.astype(np.uint64) ^ stream_key[0]))


def uniform(key: int, index: np.ndarray, stream: int | str) -> np.ndarray:
    """Uniform floats in [0, 1), one per index."""
    return (bits(key, index, stream) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


class Streams:
    """Uniforms in [0, 1) for `n` jobs, one named stream per Sobol' dimension."""

    def __init__(self, key: int, n: int, names: list[str], start: int = 0):
        import warnings

        from scipy.stats import qmc

        self.names = list(dict.fromkeys(names))
        if n == 0 or not self.names:
            self.table = np.zeros((n, len(self.names)))
            return
        with warnings.catch_warnings():  # "n is not a power of 2": prefixes are still well spread
            warnings.simplefilter("ignore")
            sobol = qmc.Sobol(d=len(self.names), scramble=True, seed=np.random.default_rng(key))
            if start:
                sobol.fast_forward(start)  # rows start.. of the same sequence: chunks equal the whole
            self.table = sobol.random(n)

    def __call__(self, name: str) -> np.ndarray:
        return self.table[:, self.names.index(name)]
