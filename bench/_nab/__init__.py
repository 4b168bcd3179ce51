"""NAB (the Numenta Anomaly Benchmark) for the sidecar's detectors: its data, a scorer written from NAB's
published rules, and a runner that feeds each series through the sidecar's own detector wiring.

``bench/nab.py`` is the benchmark; this package is what it (and the scorer's golden-file test) uses.
"""

from .corpus import NabCorpus, NabFile, NabDataMissing, default_data_dir, load_corpus
from .scorer import PROFILES, CorpusScore, FileScore, Profile, load_profiles, score_corpus, score_file, sweep

__all__ = [
    "PROFILES",
    "CorpusScore",
    "FileScore",
    "NabCorpus",
    "NabDataMissing",
    "NabFile",
    "Profile",
    "default_data_dir",
    "load_corpus",
    "load_profiles",
    "score_corpus",
    "score_file",
    "sweep",
]
