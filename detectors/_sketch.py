"""Log-bucket sketch used by RollingWindow once a horizon holds more samples than it keeps raw.

The mapping is DDSketch's (Masson, Rim & Lee, VLDB 2019): bucket ``i`` holds magnitudes in
``(gamma**(i-1), gamma**i]`` with ``gamma = (1 + a) / (1 - a)``, and its representative value
``2 * gamma**i / (gamma + 1)`` is within relative error ``a`` of every magnitude in it. Keys are
signed so that key order is value order: negative magnitudes get negative keys, magnitudes at or
below ``MIN_MAGNITUDE`` share key 0 (represented by 0.0), magnitudes above ``MAX_MAGNITUDE`` are
clamped into the top bucket. That fixed key range is what bounds a sketch's memory whatever the input.
"""

from __future__ import annotations

import math

import numpy as np

MIN_MAGNITUDE = 1e-9
MAX_MAGNITUDE = 1e18


class LogMapping:
    """Value <-> signed bucket key, vectorised."""

    __slots__ = ("alpha", "gamma", "_ln_gamma", "_i_min", "k_max")

    def __init__(self, relative_accuracy: float) -> None:
        self.alpha = relative_accuracy
        self.gamma = (1.0 + relative_accuracy) / (1.0 - relative_accuracy)
        self._ln_gamma = math.log(self.gamma)
        self._i_min = math.ceil(math.log(MIN_MAGNITUDE) / self._ln_gamma)
        i_max = math.ceil(math.log(MAX_MAGNITUDE) / self._ln_gamma)
        self.k_max = i_max - self._i_min + 1

    def keys(self, values: np.ndarray) -> np.ndarray:
        mag = np.abs(values)
        big = mag > MIN_MAGNITUDE
        with np.errstate(divide="ignore"):
            idx = np.ceil(np.log(np.where(big, mag, 1.0)) / self._ln_gamma)
        k = np.clip(idx - (self._i_min - 1), 1, self.k_max).astype(np.int64)
        k[~big] = 0
        return np.where(values < 0, -k, k)

    def values(self, keys: np.ndarray) -> np.ndarray:
        k = np.abs(keys)
        rep = 2.0 * np.power(self.gamma, k + (self._i_min - 1)) / (self.gamma + 1.0)
        rep = np.where(k == 0, 0.0, rep)
        return np.where(keys < 0, -rep, rep)


class Slice:
    """Samples evicted from the raw buffer, all within one slice width of time, as bucket counts."""

    __slots__ = ("t_first", "t_last", "n", "total", "lo", "hi", "keys", "counts")

    def __init__(self, t_first: float) -> None:
        self.t_first = t_first
        self.t_last = t_first
        self.n = 0
        self.total = 0.0
        self.lo = math.inf
        self.hi = -math.inf
        self.keys = np.empty(0, dtype=np.int64)
        self.counts = np.empty(0, dtype=np.int64)

    def absorb(self, times: np.ndarray, values: np.ndarray, mapping: LogMapping) -> None:
        keys = np.concatenate((self.keys, mapping.keys(values)))
        weights = np.concatenate((self.counts, np.ones(values.size, dtype=np.int64)))
        self.keys, inverse = np.unique(keys, return_inverse=True)
        self.counts = np.bincount(inverse, weights=weights).astype(np.int64)
        self.n += int(values.size)
        self.total += float(values.sum())
        self.lo = min(self.lo, float(values.min()))
        self.hi = max(self.hi, float(values.max()))
        self.t_last = float(times[-1])
