"""Our NAB scorer against NAB's published golden files, and its threshold sweep against brute force.

The golden check feeds the published windowed Gaussian detector's per-row anomaly scores to the scorer at
that detector's published thresholds and compares every file's score and row counts with NAB's
``results/windowedGaussian/*_scores.csv``, and the normalised score with ``results/final_results.json``.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench._nab import NabFile, load_corpus, load_profiles, score_corpus, score_file, sweep
from bench._nab.corpus import default_data_dir
from bench._nab.scorer import Profile

DATA = default_data_dir()
needs_nab = pytest.mark.skipif(not (DATA / "labels" / "combined_windows.json").is_file(),
                               reason=f"NAB data not at {DATA}")
DETECTOR = "windowedGaussian"


def _published_rows(name: str) -> np.ndarray:
    category, file = name.split("/")
    path = DATA / "results" / DETECTOR / category / f"{DETECTOR}_{file}"
    with path.open(newline="") as fh:
        return np.array([float(r["anomaly_score"]) for r in csv.DictReader(fh)])


def _published_file_scores(profile: str) -> dict[str, dict[str, str]]:
    path = DATA / "results" / DETECTOR / f"{DETECTOR}_{profile}_scores.csv"
    with path.open(newline="") as fh:
        return {row["File"] or row["Detector"]: row for row in csv.DictReader(fh)}


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(DATA)


@pytest.fixture(scope="module")
def published(corpus):
    return [_published_rows(f.name) for f in corpus.files]


@needs_nab
@pytest.mark.parametrize("profile", ["standard", "reward_low_FP_rate", "reward_low_FN_rate"])
def test_reproduces_published_windowed_gaussian(corpus, published, profile):
    prof = load_profiles(DATA)[profile]
    thresholds = json.loads((DATA / "config" / "thresholds.json").read_text())[DETECTOR]
    final = json.loads((DATA / "results" / "final_results.json").read_text())[DETECTOR]
    gold = _published_file_scores(profile)
    result = score_corpus(corpus.files, published, prof, threshold=thresholds[profile]["threshold"])
    assert len(result.files) == len(gold) - 1 == 58  # and the Totals row
    for fs in result.files:
        row = gold[fs.name]
        assert fs.score == pytest.approx(float(row["Score"]), abs=1e-6), fs.name
        assert (fs.tp, fs.tn, fs.fp, fs.fn, fs.total) == tuple(
            int(row[k]) for k in ("TP", "TN", "FP", "FN", "Total_Count")), fs.name
    assert result.raw == pytest.approx(float(gold["Totals"]["Score"]), abs=1e-6)
    assert result.normalised == pytest.approx(final[profile], abs=1e-6)


@needs_nab
def test_sweep_finds_the_published_threshold(corpus, published):
    prof = load_profiles(DATA)["standard"]
    threshold, raw = sweep(corpus.files, published, prof)
    assert threshold == 1.0
    assert raw == pytest.approx(float(_published_file_scores("standard")["Totals"]["Score"]), abs=1e-6)


@needs_nab
def test_null_and_perfect_detectors(corpus):
    prof = load_profiles(DATA)["reward_low_FN_rate"]
    null = score_corpus(corpus.files, [np.zeros(len(f)) for f in corpus.files], prof, threshold=0.5)
    assert null.raw == null.null == -2.0 * 116 and null.normalised == 0.0
    perfect = []
    for f in corpus.files:
        s = np.zeros(len(f))
        s[[left for left, _ in f.windows]] = 1.0
        perfect.append(s)
    best = score_corpus(corpus.files, perfect, prof)
    assert best.threshold == 1.0 and best.normalised == pytest.approx(100.0)


def _file(n: int, windows, probation: int) -> NabFile:
    times = np.datetime64("2024-01-01T00:00:00", "us") + np.arange(n) * np.timedelta64(300, "s")
    f = NabFile("synthetic/x.csv", times, np.zeros(n), tuple(windows))
    object.__setattr__(f, "probation", probation)
    return f


@st.composite
def _files(draw):
    n = draw(st.integers(20, 80))
    cuts = sorted(draw(st.lists(st.integers(0, n - 1), min_size=0, max_size=6, unique=True)))
    windows = [(cuts[i], cuts[i + 1]) for i in range(0, len(cuts) - 1, 2)]
    scores = np.array(draw(st.lists(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]), min_size=n, max_size=n)))
    return _file(n, windows, draw(st.integers(0, n // 4))), scores


@settings(max_examples=60, deadline=None)
@given(st.lists(_files(), min_size=1, max_size=3), st.sampled_from([(1.0, 0.11, 1.0), (1.0, 0.22, 1.0), (1.0, 0.11, 2.0)]))
def test_sweep_is_the_best_of_every_threshold(pairs, weights):
    prof = Profile("p", *weights)
    files = [f for f, _ in pairs]
    scores = [s for _, s in pairs]
    threshold, raw = sweep(files, scores, prof)
    candidates = {float(x) for f, s in pairs for x in s[f.probation:]} | {np.inf}
    brute = {t: sum(score_file(f, s, t, prof).score for f, s in zip(files, scores)) for t in candidates}
    assert raw == pytest.approx(max(brute.values()), abs=1e-9)
    assert brute[threshold] == pytest.approx(raw, abs=1e-9)
