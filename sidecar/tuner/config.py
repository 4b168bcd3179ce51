"""The ``sidecar.tuner`` section: objectives, bounds and guardrails of the auto-tuner (requirement 12)."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator, model_validator

from sidecar._section import Section as _Section
from sidecar.tuner.policy import (
    BATCH_TIMEOUT,
    KNOBS,
    KV_BUDGET,
    MAX_BATCH,
    MAX_QUEUE_WAIT,
    QUEUE_CAPACITY,
    RUNNING_LIMIT,
)


class SloConfig(_Section):
    """A latency objective: what the tuner keeps requests of one model within."""

    p99_s: float = Field(2.0, gt=0, le=3600, description="99th percentile of end-to-end latency (admission to last byte).")
    ttft_p99_s: float | None = Field(
        None, gt=0, le=3600, description="99th percentile of time to first token of streamed requests; unset: not an objective."
    )


class KnobConfig(_Section):
    """Hard bounds of one knob and how far one tick may move it."""

    min: float = Field(..., ge=0, description="Lowest value the tuner may set.")
    max: float = Field(..., ge=0, description="Highest value the tuner may set.")
    max_step_ratio: float = Field(2.0, ge=1, le=100, description="One tick multiplies or divides by at most this.")
    min_step: float = Field(0.0, ge=0, description="A step may always move this far (values near zero).")

    @model_validator(mode="after")
    def _order(self) -> KnobConfig:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) exceeds max ({self.max})")
        return self


def _default_knobs() -> dict[str, KnobConfig]:
    return {
        QUEUE_CAPACITY: KnobConfig(min=4, max=4096, max_step_ratio=4.0),
        MAX_QUEUE_WAIT: KnobConfig(min=0.01, max=60.0, max_step_ratio=2.0, min_step=0.01),
        MAX_BATCH: KnobConfig(min=1, max=64, max_step_ratio=2.0),
        BATCH_TIMEOUT: KnobConfig(min=0.0, max=0.05, max_step_ratio=4.0, min_step=0.002),
        KV_BUDGET: KnobConfig(min=16 * 1024**2, max=8 * 1024**3, max_step_ratio=1.5),
        RUNNING_LIMIT: KnobConfig(min=1, max=1024, max_step_ratio=1.5),
    }


class TunerConfig(_Section):
    """The closed loop: reads the sidecar's windows and the orchestrator's state, sets runtime keys through its
    admin API. Off (``enabled: false``) it sends nothing and the orchestrator's static configuration stands."""

    enabled: bool = Field(
        True, description="Tune the orchestrator at `collectors.orchestrator.url`; it acts only with `admin_token` set."
    )
    admin_token: SecretStr | None = Field(
        None, min_length=16, description="The orchestrator's `server.admin_token` (a secret: shown as ***)."
    )
    interval_s: float = Field(2.0, ge=0.1, le=600, description="Fast loop tick: how often readings are taken and acted on.")
    window: str = Field("10s", description="Which `monitor.windows` entry the fast loop reads.")
    slo: SloConfig = SloConfig()
    models: dict[str, SloConfig] = Field({}, description="Objectives per model name; models not listed get `slo`.")
    knobs: dict[str, KnobConfig] = Field(
        default_factory=_default_knobs,
        description=f"Knobs the tuner may turn, with their bounds; leave one out to leave it alone. Known: {', '.join(KNOBS)}.",
    )
    deadband: float = Field(
        0.3, ge=0, lt=1, description="No change to gain while p99 is above `(1 - deadband) * SLO` (hysteresis)."
    )
    admission_share: float = Field(
        0.7, gt=0, le=1, description="Share of the SLO a request may spend in the server by Little's law (queue + run)."
    )
    timeout_share: float = Field(0.05, gt=0, le=1, description="Largest batch timeout as a share of the SLO.")
    cooldown_s: float = Field(4.0, ge=0, le=3600, description="Least time between two changes of one knob made to gain.")
    trial_s: float = Field(
        12.0, ge=0, le=3600,
        description="After a change made to gain, how long before it is judged (and rolled back if worse); at least "
        "the `window`, so the judgement reads only requests served after the change.",
    )
    rollback_tolerance: float = Field(
        0.05, ge=0, le=1, description="A drop of goodput/offered larger than this after a change rolls it back."
    )
    bar_s: float = Field(120.0, ge=0, le=86400, description="A rolled-back move is not tried again at that load level for this long.")
    attainment_target: float = Field(0.99, gt=0, le=1, description="SLO attainment the tuner treats as meeting the objective.")
    memory_reserve_ratio: float = Field(
        0.2, ge=0, lt=1, description="Host memory kept free: below it the KV-cache budget shrinks, and it never grows into it."
    )
    state_dir: str | None = Field(
        None, description="Where the history (SQLite) lives; default: <MUAI_CACHE_DIR or ~/.cache/muai>/sidecar."
    )
    history_keep_s: float = Field(7 * 86400.0, gt=0, description="History older than this is pruned.")
    request_timeout_s: float = Field(2.0, gt=0, le=60, description="Timeout of one call to the orchestrator.")
    decisions_kept: int = Field(200, ge=1, le=100_000, description="Recent decisions shown by GET /api/v1/tuner.")

    @field_validator("knobs")
    @classmethod
    def _known_knobs(cls, value: dict[str, KnobConfig]) -> dict[str, KnobConfig]:
        unknown = sorted(set(value) - set(KNOBS))
        if unknown:
            raise ValueError(f"unknown knob(s) {unknown}; known: {list(KNOBS)}")
        return value

    def slo_for(self, model: str) -> SloConfig:
        return self.models.get(model, self.slo)


__all__ = ["KnobConfig", "SloConfig", "TunerConfig"]
