"""The sidecar's auto-tuner (requirement 12): a pure policy, its SQLite history, and the shell that drives the
orchestrator's admin API. ``docs/tuner.md`` says how it decides."""

from sidecar.tuner.config import KnobConfig, SloConfig, TunerConfig
from sidecar.tuner.policy import (
    KNOBS,
    REASONS,
    Bounds,
    Decision,
    LearnedTable,
    ModelReading,
    Observation,
    Readings,
    TickResult,
    TunerPolicy,
    load_level,
)
from sidecar.tuner.shell import Tuner, policy_from_config
from sidecar.tuner.store import TunerStore

__all__ = [
    "KNOBS",
    "REASONS",
    "Bounds",
    "Decision",
    "KnobConfig",
    "LearnedTable",
    "ModelReading",
    "Observation",
    "Readings",
    "SloConfig",
    "TickResult",
    "Tuner",
    "TunerConfig",
    "TunerPolicy",
    "TunerStore",
    "load_level",
    "policy_from_config",
]
