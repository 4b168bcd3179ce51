"""Pure numerics for the sidecar: rolling windows, percentiles, threshold and statistical detectors.

Everything here is synchronous, takes ``now`` as an argument and does no I/O. Only numpy is used;
importing this package never imports an inference engine.
"""

from .base import Detector, Verdict
from .errors import DetectorConfigError, DetectorError, UnknownWindowError
from .likelihood import LikelihoodDetector
from .novelty import NoveltyDetector
from .seasonal import DailyRecurrence, RecurringGate
from .statistical import CusumDetector, EwmaDetector, MadDetector
from .threshold import (
    RuleState,
    ThresholdRule,
    error_rate_above,
    latency_above,
    memory_percent_above,
    throughput_below,
)
from .window import (
    DEFAULT_HORIZONS,
    MultiRatioWindow,
    MultiWindow,
    RatioWindow,
    RollingWindow,
    WindowStats,
)

__all__ = [
    "DEFAULT_HORIZONS",
    "CusumDetector",
    "DailyRecurrence",
    "Detector",
    "DetectorConfigError",
    "DetectorError",
    "EwmaDetector",
    "LikelihoodDetector",
    "MadDetector",
    "MultiRatioWindow",
    "MultiWindow",
    "NoveltyDetector",
    "RatioWindow",
    "RecurringGate",
    "RollingWindow",
    "RuleState",
    "ThresholdRule",
    "UnknownWindowError",
    "Verdict",
    "WindowStats",
    "error_rate_above",
    "latency_above",
    "memory_percent_above",
    "throughput_below",
]
