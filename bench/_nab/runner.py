"""NAB series through the sidecar's own detectors: the real :class:`sidecar.evaluation.Evaluator` with its
:class:`alerting.AlertBook`, one point per row (the row's value as that interval's p95), ``now`` and the
alerts' wall time from the row's timestamp. A detection is an alert's onset (its firing transition): an
alert that stays on is one page, so it is one detection."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from alerting import AlertBook
from sidecar.config import DetectorsConfig, MonitorConfig, StatisticalConfig
from sidecar.evaluation import ALERT_ANOMALY, STATISTICAL_DETECTORS, Evaluator
from sidecar.monitor import PerformanceMonitor

from .corpus import NabFile

DETECTORS = STATISTICAL_DETECTORS
COMBINED = "default"


def _all_on(config: StatisticalConfig, names: Sequence[str] = DETECTORS) -> StatisticalConfig:
    # Each detector raises its own alert, so one run with all of them on gives each one's onsets as if it ran
    # alone; the combination is then the union of those the configuration enables.
    return config.model_copy(update={name: getattr(config, name).model_copy(update={"enabled": name in names})
                                     for name in DETECTORS})


def onsets(f: NabFile, config: StatisticalConfig, names: Sequence[str] = DETECTORS) -> dict[str, np.ndarray]:
    """Per detector in ``names``, a 0/1 array over ``f``'s rows with 1 where its LatencyAnomaly alert started
    firing, and the union of those ``config`` enables as ``"default"``."""
    evaluator = Evaluator(DetectorsConfig(statistical=_all_on(config, names)), monitor=PerformanceMonitor(windows=MonitorConfig().windows), book=AlertBook())
    out = {name: np.zeros(len(f)) for name in names}
    for i, (value, now) in enumerate(zip(f.values.tolist(), f.seconds.tolist(), strict=True)):
        for alert in evaluator.judge_point("nab", "series", value, now, now):
            if alert.status == "firing" and alert.labels["alertname"] == ALERT_ANOMALY:
                out[alert.labels["detector"]][i] = 1.0
    enabled = [name for name in names if getattr(config, name).enabled]
    out[COMBINED] = np.max([out[name] for name in enabled], axis=0) if enabled else np.zeros(len(f))
    return out


def run(
    files: Sequence[NabFile], config: StatisticalConfig, names: Sequence[str] = DETECTORS
) -> dict[str, list[np.ndarray]]:
    """:func:`onsets` for every file, as ``{detector: [per-file array, ...]}`` (plus ``"default"``)."""
    per_file = [onsets(f, config, names) for f in files]
    return {name: [d[name] for d in per_file] for name in (*names, COMBINED)}
