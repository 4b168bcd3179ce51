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


def _only(config: StatisticalConfig, names: Sequence[str]) -> StatisticalConfig:
    return config.model_copy(update={name: getattr(config, name).model_copy(update={"enabled": name in names})
                                     for name in DETECTORS})


def _run(f: NabFile, config: StatisticalConfig) -> dict[str, np.ndarray]:
    evaluator = Evaluator(DetectorsConfig(statistical=config), monitor=PerformanceMonitor(windows=MonitorConfig().windows),
                          book=AlertBook())
    out = {name: np.zeros(len(f)) for name in DETECTORS}
    for i, (value, now) in enumerate(zip(f.values.tolist(), f.seconds.tolist(), strict=True)):
        for alert in evaluator.judge_point("nab", "series", value, now, now):
            if alert.status == "firing" and alert.labels["alertname"] == ALERT_ANOMALY:
                out[alert.labels["detector"]][i] = 1.0
    return out


def onsets(f: NabFile, config: StatisticalConfig, names: Sequence[str] = DETECTORS) -> dict[str, np.ndarray]:
    """Per detector in ``names``, a 0/1 array over ``f``'s rows with 1 where its LatencyAnomaly alert started
    firing when it runs alone, and as ``"default"`` the onsets of all the alerts of ``config`` as it stands.

    The detectors of one series are not independent (``repeat_hold_s``: one page per incident, so while one
    fires, or soon after, another's finding does not page), so the combination is its own run, not the union
    of the detectors' own runs.
    """
    out = {name: _run(f, _only(config, (name,)))[name] for name in names}
    shipped = _run(f, config)
    out[COMBINED] = np.max([shipped[name] for name in DETECTORS], axis=0)
    return out


def run(
    files: Sequence[NabFile], config: StatisticalConfig, names: Sequence[str] = DETECTORS
) -> dict[str, list[np.ndarray]]:
    """:func:`onsets` for every file, as ``{detector: [per-file array, ...]}`` (plus ``"default"``)."""
    per_file = [onsets(f, config, names) for f in files]
    return {name: [d[name] for d in per_file] for name in (*names, COMBINED)}
