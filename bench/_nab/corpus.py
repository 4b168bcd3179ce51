"""NAB's data as arrays: each series' timestamps and values, its anomaly windows as row ranges, and which rows
are scored (everything after the probationary period)."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]

SUBSET_CATEGORIES = ("realKnownCause", "realAWSCloudwatch")
"""The server metrics: EC2 CPU, request latency, network, disk, ELB request counts."""

# NAB's rule: the first 15% of each file is not scored, capped at 15% of 5,000 rows.
PROBATION_FRACTION = 0.15
PROBATION_CAP = 750


class NabDataMissing(FileNotFoundError):
    """The NAB data folder is missing or incomplete."""


def default_data_dir() -> Path:
    """``../shared/nab`` relative to the repository root."""
    return (REPO_ROOT / ".." / "shared" / "nab").resolve()


def probation_rows(n: int) -> int:
    return int(min(math.floor(PROBATION_FRACTION * n), PROBATION_CAP))


def _parse_times(stamps: list[str]) -> np.ndarray:
    # NAB writes window bounds with microseconds ("2014-02-19 10:50:00.000000") and rows without.
    return np.array([s.strip().replace(" ", "T") for s in stamps], dtype="datetime64[us]")


@dataclass(frozen=True, eq=False)
class NabFile:
    """One series. ``windows`` are inclusive row ranges ``(left, right)``, in time order."""

    name: str  # "<category>/<file>.csv", NAB's key
    times: np.ndarray  # datetime64[us]
    values: np.ndarray
    windows: tuple[tuple[int, int], ...]
    probation: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "probation", probation_rows(len(self.values)))

    @property
    def category(self) -> str:
        return self.name.split("/", 1)[0]

    @property
    def seconds(self) -> np.ndarray:
        """Timestamps as float seconds since the epoch (what the sidecar's ``now`` is)."""
        return self.times.astype("datetime64[us]").astype(np.int64) / 1e6

    def __len__(self) -> int:
        return len(self.values)


@dataclass(frozen=True)
class NabCorpus:
    root: Path
    files: tuple[NabFile, ...]

    def subset(self, categories=SUBSET_CATEGORIES) -> list[NabFile]:
        return [f for f in self.files if f.category in categories]

    def others(self, categories=SUBSET_CATEGORIES) -> list[NabFile]:
        return [f for f in self.files if f.category not in categories]

    def get(self, name: str) -> NabFile:
        for f in self.files:
            if f.name == name:
                return f
        raise KeyError(name)


def _window_rows(name: str, times: np.ndarray, bounds: list[list[str]]) -> tuple[tuple[int, int], ...]:
    out = []
    for start, end in bounds:
        lo, hi = _parse_times([start, end])
        left = int(np.searchsorted(times, lo, side="left"))
        right = int(np.searchsorted(times, hi, side="right")) - 1
        if left >= len(times) or times[left] != lo or right < left or times[right] != hi:
            raise NabDataMissing(f"{name}: window {start} .. {end} does not start and end on rows of the file")
        out.append((left, right))
    return tuple(sorted(out))


def read_series(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [r["timestamp"] for r in rows], rows


def load_corpus(data_dir: str | Path | None = None, *, names: list[str] | None = None) -> NabCorpus:
    """Read ``data/*/*.csv`` and ``labels/combined_windows.json`` (all 58 files, or only ``names``)."""
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    labels = root / "labels" / "combined_windows.json"
    if not labels.is_file():
        raise NabDataMissing(
            f"NAB data not found at {root} (no labels/combined_windows.json); pass --data-dir or put NAB's data, "
            "labels, config and results there"
        )
    windows = json.loads(labels.read_text())
    files = []
    for name in sorted(windows) if names is None else names:
        path = root / "data" / name
        if not path.is_file():
            raise NabDataMissing(f"NAB series {path} is missing")
        stamps, rows = read_series(path)
        times = _parse_times(stamps)
        values = np.array([float(r["value"]) for r in rows])
        files.append(NabFile(name, times, values, _window_rows(name, times, windows[name])))
    return NabCorpus(root, tuple(files))
