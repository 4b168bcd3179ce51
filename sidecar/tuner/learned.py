"""The slow loop's memory: per load level, what each settings signature achieved. Pure; the store feeds it."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from sidecar.tuner.readings import INTEGER_KNOBS, KNOBS, Observation, Readings, Value


@dataclass(slots=True)
class _Score:
    n: int = 0
    goodput: float = 0.0
    attainment: float = 0.0

    def add(self, goodput: float, attainment: float) -> None:
        self.n += 1
        self.goodput += (goodput - self.goodput) / self.n
        self.attainment += (attainment - self.attainment) / self.n


class LearnedTable:
    """Per load level, the mean goodput and attainment each settings signature achieved. Pure."""

    def __init__(self, *, min_samples: int = 3, attainment_target: float = 0.99) -> None:
        self.min_samples = min_samples
        self.attainment_target = attainment_target
        self._levels: dict[str, dict[tuple[tuple[str, Value], ...], _Score]] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self._levels.values())

    def levels(self) -> list[str]:
        return sorted(self._levels)

    def observe(self, obs: Observation) -> None:
        if math.isnan(obs.attainment) or math.isnan(obs.goodput_per_s):
            return
        sig = _signature(obs.settings)
        self._levels.setdefault(obs.load_level, {}).setdefault(sig, _Score()).add(obs.goodput_per_s, obs.attainment)

    def load(self, observations: Iterable[Observation]) -> int:
        n = 0
        for obs in observations:
            self.observe(obs)
            n += 1
        return n

    def best(self, level: str) -> tuple[dict[str, Value], float, float] | None:
        """The settings with the best goodput at ``level`` among those that met the attainment target (else the
        best attainment), with their mean goodput and attainment; None before ``min_samples`` ticks of any."""
        scores = [(sig, s) for sig, s in self._levels.get(level, {}).items() if s.n >= self.min_samples]
        if not scores:
            return None
        meeting = [(sig, s) for sig, s in scores if s.attainment >= self.attainment_target]
        if meeting:
            sig, score = max(meeting, key=lambda item: (item[1].goodput, item[1].n))
        else:
            sig, score = max(scores, key=lambda item: (item[1].attainment, item[1].goodput))
        return dict(sig), score.goodput, score.attainment


def _signature(settings: Mapping[str, Value]) -> tuple[tuple[str, Value], ...]:
    out = []
    for knob in KNOBS:
        if knob not in settings:
            continue
        value = settings[knob]
        if isinstance(value, float) and knob not in INTEGER_KNOBS:
            value = round(value, 4)
        out.append((knob, value))
    return tuple(out)


def load_level(readings: Readings) -> str:
    """Which load bucket a tick falls in: offered requests per second in half-octaves, prompt length in octaves.

    Coarse on purpose: the slow loop needs several ticks per bucket before it trusts what it learned there.
    """
    offered = readings.offered_per_s
    rate = "idle" if offered < 0.05 else f"{round(2 * math.log2(offered)) / 2:g}"
    lengths = [m.mean_input_tokens for m in readings.models if not math.isnan(m.mean_input_tokens) and m.requests_per_s]
    prompt = "-" if not lengths else f"{round(math.log2(max(1.0, max(lengths))))}"
    return f"rps2^{rate}/tok2^{prompt}"


__all__ = ["LearnedTable", "load_level"]
