"""NAB's scoring rules, written from the paper (Lavin & Ahmad 2015) and the benchmark's published description.

* Rows in the probationary period are not scored.
* Every scored row has a weight. Inside an anomaly window of ``width`` rows ending at row ``right``, row ``i``
  sits at ``p = -(right - i + 1) / width`` (-1 at the window's first row, towards 0 at its last) and is worth
  ``tp * sigma(p) / sigma(-1)`` with the scaled sigmoid ``sigma(p) = 2 / (1 + exp(5 p)) - 1``: the earliest
  detection earns most. Outside every window a detection costs ``fp * sigma(d)`` (a negative number) with
  ``d = |i - right_prev| / (width_prev - 1)`` its distance after the previous window's last row, and
  ``sigma(d) = -1`` beyond three widths or before any window: a late echo of an anomaly costs less than a
  false alarm out of the blue.
* A detection is a row whose anomaly score is at least the threshold. A window's score is the best weight
  among its detected rows (its earliest detection), or ``-fn`` when none was detected; a file's score adds
  its windows' scores and the costs of all its detections outside windows.
* One threshold per profile, the one that maximises the sum over the whole corpus (every distinct score is
  tried, and "detect nothing").
* Normalised score: ``100 * (raw - null) / (perfect - null)``, where the null detector misses every window
  (``-fn`` per window) and the perfect one detects each at its first row (``tp`` per window).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .corpus import NabFile

PROFILES = ("standard", "reward_low_FP_rate", "reward_low_FN_rate")
_FAR_AFTER = 3.0  # widths after a window beyond which a false positive costs the full weight


@dataclass(frozen=True)
class Profile:
    name: str
    tp: float
    fp: float
    fn: float
    tn: float = 1.0


def load_profiles(data_dir: str | Path) -> dict[str, Profile]:
    """``config/profiles.json`` as :class:`Profile` objects, keyed by name."""
    raw = json.loads((Path(data_dir) / "config" / "profiles.json").read_text())
    out = {}
    for name, body in raw.items():
        m = body["CostMatrix"]
        out[name] = Profile(name, m["tpWeight"], m["fpWeight"], m["fnWeight"], m.get("tnWeight", 1.0))
    return out


def scaled_sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    out = 2.0 / (1.0 + np.exp(5.0 * x)) - 1.0
    return np.where(x > _FAR_AFTER, -1.0, out)


_MAX_TP = float(scaled_sigmoid(np.array(-1.0)))


@dataclass(frozen=True)
class _Rows:
    """One file's scored rows: ``weight`` (what a detection there adds), ``window`` (index or -1)."""

    weight: np.ndarray
    window: np.ndarray
    windows: int


def _rows(f: NabFile, profile: Profile) -> _Rows:
    n = len(f)
    i = np.arange(n)
    weight = np.empty(n)
    window = np.full(n, -1, dtype=np.int64)
    prev_right: int | None = None
    prev_width = 0.0
    start = 0
    for k, (left, right) in enumerate(f.windows):
        _fp_weights(weight, i, start, left, prev_right, prev_width, profile)
        width = float(right - left + 1)
        pos = -(right - i[left : right + 1] + 1) / width
        weight[left : right + 1] = scaled_sigmoid(pos) * profile.tp / _MAX_TP
        window[left : right + 1] = k
        prev_right, prev_width, start = right, width, right + 1
    _fp_weights(weight, i, start, n, prev_right, prev_width, profile)
    keep = slice(f.probation, n)
    win = window[keep]
    seen = np.unique(win[win >= 0])
    # Windows wholly inside the probationary period are not scored: renumber the rest from 0.
    remap = np.full(len(f.windows) + 1, -1, dtype=np.int64)
    remap[seen] = np.arange(len(seen))
    return _Rows(weight[keep].copy(), remap[win], len(seen))


def _fp_weights(weight, i, lo, hi, prev_right, prev_width, profile) -> None:
    if hi <= lo:
        return
    if prev_right is None:
        weight[lo:hi] = -1.0 * profile.fp
        return
    # A one-row window has no width to scale by; NAB's rule then reads every later row as far away.
    dist = np.abs(prev_right - i[lo:hi]) / (prev_width - 1.0) if prev_width > 1 else np.full(hi - lo, np.inf)
    weight[lo:hi] = scaled_sigmoid(dist) * profile.fp


@dataclass(frozen=True)
class FileScore:
    name: str
    threshold: float
    score: float
    tp: int
    tn: int
    fp: int
    fn: int
    total: int
    windows: int
    detected_windows: int


def score_file(f: NabFile, scores: np.ndarray, threshold: float, profile: Profile) -> FileScore:
    """The raw NAB score of one file: rows with ``scores >= threshold`` are detections."""
    rows = _rows(f, profile)
    s = np.asarray(scores, dtype=float)[f.probation :]
    hit = s >= threshold
    inside = rows.window >= 0
    fp_cost = float(rows.weight[hit & ~inside].sum())
    best = np.full(rows.windows, -np.inf)
    np.maximum.at(best, rows.window[hit & inside], rows.weight[hit & inside])
    detected = np.isfinite(best)
    raw = fp_cost + float(best[detected].sum()) - profile.fn * int((~detected).sum())
    return FileScore(
        f.name, float(threshold), raw,
        tp=int((hit & inside).sum()), tn=int((~hit & ~inside).sum()),
        fp=int((hit & ~inside).sum()), fn=int((~hit & inside).sum()),
        total=len(f), windows=rows.windows, detected_windows=int(detected.sum()),
    )


def sweep(files: Sequence[NabFile], scores: Sequence[np.ndarray], profile: Profile) -> tuple[float, float]:
    """The threshold that maximises the summed raw score over ``files``, and that sum.

    Every distinct anomaly score is a candidate (detections are the rows at or above it), and so is
    "detect nothing" (``inf``). Ties go to the higher threshold.
    """
    weights, windows, values = [], [], []
    offset = 0
    for f, sc in zip(files, scores, strict=True):
        rows = _rows(f, profile)
        weights.append(rows.weight)
        windows.append(np.where(rows.window >= 0, rows.window + offset, -1))
        values.append(np.asarray(sc, dtype=float)[f.probation :])
        offset += rows.windows
    w = np.concatenate(weights)
    win = np.concatenate(windows)
    s = np.concatenate(values)
    nothing = -profile.fn * offset
    if not len(s):
        return math.inf, nothing
    order = np.argsort(-s, kind="stable")
    s, w, win = s[order], w[order], win[order]
    # What each detection adds as the threshold falls past it: its own cost outside windows; inside, by how
    # much it beats the window's best so far (a window starts at -fn).
    gain = np.where(win < 0, w, 0.0)
    ins = np.flatnonzero(win >= 0)
    if len(ins):
        by_window = ins[np.argsort(win[ins], kind="stable")]
        g = win[by_window]
        # Weights inside windows lie in (0, tp]; offsetting each window by more than that range lets one
        # running maximum over all windows act as a running maximum per window.
        span = 2.0 * max(profile.tp, 1.0) + profile.fn
        run = np.maximum.accumulate(w[by_window] + span * g) - span * g
        first = np.r_[True, g[1:] != g[:-1]]
        before = np.where(first, -profile.fn, np.r_[0.0, run[:-1]])
        gain[by_window] = run - before
    total = nothing + np.cumsum(gain)
    # A threshold takes every row at or above it: read the total at the last row of each run of equal scores.
    last = np.r_[s[1:] != s[:-1], True]
    cand_s, cand_total = s[last], total[last]
    best = int(np.argmax(cand_total))
    if cand_total[best] <= nothing:
        return math.inf, nothing
    return float(cand_s[best]), float(cand_total[best])


@dataclass(frozen=True)
class CorpusScore:
    profile: str
    threshold: float
    raw: float
    null: float
    perfect: float
    files: tuple[FileScore, ...]

    @property
    def normalised(self) -> float:
        return 100.0 * (self.raw - self.null) / (self.perfect - self.null)


def score_corpus(
    files: Sequence[NabFile], scores: Sequence[np.ndarray], profile: Profile, *, threshold: float | None = None
) -> CorpusScore:
    """Score ``files`` at ``threshold``, or at the best one for this corpus when None (NAB's optimiser)."""
    if threshold is None:
        threshold, _ = sweep(files, scores, profile)
    per_file = tuple(score_file(f, sc, threshold, profile) for f, sc in zip(files, scores, strict=True))
    n_windows = sum(fs.windows for fs in per_file)
    return CorpusScore(
        profile.name, threshold, sum(fs.score for fs in per_file),
        null=-profile.fn * n_windows, perfect=profile.tp * n_windows, files=per_file,
    )
