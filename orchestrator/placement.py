"""Placement: which devices each replica of each model gets. Pure and synchronous; the manager is the shell.

A model replica needs ``tensor_parallel * pipeline_parallel`` distinct devices, each holding an equal share of the
model's weights plus its KV budget. The planner hands replicas the least-loaded devices first, puts replicas of one
model on distinct devices where it can (so losing one device costs one replica, not all of them), and never
promises a device more than its ``free_bytes``. A replica of several devices (tensor or pipeline parallel) never
shares a device with another replica of its model: its engine (vLLM, DeepSpeed) is pinned to exactly those
devices and sizes its memory by the whole device, so two such groups on one GPU would each count on memory the
other holds; it is refused instead. What cannot fit is refused with a message naming the model, the
bytes per device and how many devices it needed, so an operator knows what to add or shrink.

Re-planning is the same call with the previous plan: placements whose devices are all still usable (healthy, not
cordoned) and still big enough are kept as they are, so a lost or cordoned device moves only the replicas that sat
on it, and adding a model moves nothing already placed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from orchestrator.errors import MuaiError

__all__ = ["Device", "ModelDemand", "Placement", "PlacementBook", "PlacementError", "Plan", "Refusal", "plan_placement"]


class PlacementError(MuaiError, ValueError):
    """A plan had refusals where none were allowed (start-up); the message lists what is short."""

    def __init__(self, refusals: Sequence[Refusal]) -> None:
        self.refusals = tuple(refusals)
        super().__init__("; ".join(r.message for r in self.refusals))


@dataclass(frozen=True)
class ModelDemand:
    """What one model asks for: its bytes and its parallel layout, per replica."""

    name: str
    weight_bytes: int
    kv_budget_bytes: int = 0
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    replicas: int = 1

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("ModelDemand.name must not be empty")
        if self.weight_bytes < 0 or self.kv_budget_bytes < 0:
            raise ValueError(f"model {self.name!r}: weight_bytes and kv_budget_bytes must be >= 0")
        if self.tensor_parallel < 1 or self.pipeline_parallel < 1 or self.replicas < 1:
            raise ValueError(f"model {self.name!r}: tensor_parallel, pipeline_parallel and replicas must be >= 1")

    @property
    def devices_per_replica(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel

    @property
    def bytes_per_device(self) -> int:
        # Ranks split weights and KV evenly; rounding up keeps the promise conservative.
        return math.ceil((self.weight_bytes + self.kv_budget_bytes) / self.devices_per_replica)


@dataclass(frozen=True)
class Device:
    """One accelerator (or the CPU) as the inventory reports it.

    ``free_bytes`` is what the planner may hand out: total less what anything it does not place already uses.
    """

    id: str
    total_bytes: int
    free_bytes: int
    healthy: bool = True
    cordoned: bool = False
    utilisation: float = 0.0

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("Device.id must not be empty")
        if not 0 <= self.free_bytes <= self.total_bytes:
            raise ValueError(f"device {self.id!r}: need 0 <= free_bytes <= total_bytes")
        if not 0.0 <= self.utilisation <= 1.0:
            raise ValueError(f"device {self.id!r}: utilisation must be in [0, 1]")

    @property
    def usable(self) -> bool:
        return self.healthy and not self.cordoned


@dataclass(frozen=True)
class Placement:
    """Replica ``replica`` of ``model`` on ``devices`` (rank order: pipeline stage major, tensor rank minor)."""

    model: str
    replica: int
    devices: tuple[str, ...]
    bytes_per_device: int


@dataclass(frozen=True)
class Refusal:
    """A replica that could not be placed, and why."""

    model: str
    replica: int
    bytes_per_device: int
    devices_needed: int
    devices_fitting: int
    apart: bool = False
    """The devices had to be apart from the model's other replicas (a multi-device replica)."""

    @property
    def message(self) -> str:
        where = " not held by its other replicas" if self.apart else ""
        return (
            f"model {self.model!r} replica {self.replica} needs {self.devices_needed} usable device(s){where} with "
            f"{self.bytes_per_device} bytes free each; only {self.devices_fitting} had that much left"
        )


@dataclass(frozen=True)
class Plan:
    placements: tuple[Placement, ...] = ()
    refusals: tuple[Refusal, ...] = ()
    _index: dict[tuple[str, int], Placement] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._index.update({(p.model, p.replica): p for p in self.placements})

    def replicas_of(self, model: str) -> list[Placement]:
        return sorted((p for p in self.placements if p.model == model), key=lambda p: p.replica)

    def get(self, model: str, replica: int) -> Placement | None:
        return self._index.get((model, replica))

    def used_bytes(self) -> dict[str, int]:
        used: dict[str, int] = {}
        for p in self.placements:
            for device in p.devices:
                used[device] = used.get(device, 0) + p.bytes_per_device
        return used

    def raise_if_refused(self) -> Plan:
        if self.refusals:
            raise PlacementError(self.refusals)
        return self


def plan_placement(
    models: Iterable[ModelDemand], devices: Iterable[Device], *, previous: Plan | None = None
) -> Plan:
    """Place every replica of every model, keeping still-valid placements of ``previous``."""
    models = list(models)
    devices = list(devices)
    if len({m.name for m in models}) != len(models):
        raise ValueError("model names must be unique")
    if len({d.id for d in devices}) != len(devices):
        raise ValueError("device ids must be unique")
    usable = {d.id: d for d in devices if d.usable}
    left = {d.id: d.free_bytes for d in usable.values()}
    replica_count = dict.fromkeys(usable, 0)

    def take(placement: Placement) -> None:
        for device in placement.devices:
            left[device] -= placement.bytes_per_device
            replica_count[device] += 1

    placements: list[Placement] = []
    kept: set[tuple[str, int]] = set()
    by_name = {m.name: m for m in models}
    for old in previous.placements if previous is not None else ():
        model = by_name.get(old.model)
        if (
            model is not None
            and old.replica < model.replicas
            and len(old.devices) == model.devices_per_replica
            and old.bytes_per_device == model.bytes_per_device
            and all(d in usable and left[d] >= old.bytes_per_device for d in old.devices)
        ):
            take(old)
            placements.append(old)
            kept.add((old.model, old.replica))

    refusals: list[Refusal] = []
    # Biggest per-device demand first: the usual first-fit-decreasing order, so small models fill the gaps.
    for model in sorted(models, key=lambda m: (-m.bytes_per_device, m.name)):
        need, size = model.devices_per_replica, model.bytes_per_device
        for replica in range(model.replicas):
            if (model.name, replica) in kept:
                continue
            siblings = {d for p in placements if p.model == model.name for d in p.devices}
            fitting = [d for d in usable if left[d] >= size]
            apart = need > 1 and bool(siblings)
            if apart:
                fitting = [d for d in fitting if d not in siblings]

            def load(device_id: str) -> tuple[int, int, float, float, str]:
                device = usable[device_id]
                used_share = 1.0 - left[device_id] / device.total_bytes if device.total_bytes else 1.0
                # Distinct from siblings first, then fewest replicas, then busiest last, then emptiest.
                return (int(device_id in siblings), replica_count[device_id], device.utilisation, used_share, device_id)

            chosen = sorted(fitting, key=load)[:need]
            if len(chosen) < need:
                refusals.append(Refusal(model.name, replica, size, need, len(fitting), apart=apart))
                continue
            placement = Placement(model.name, replica, tuple(chosen), size)
            take(placement)
            placements.append(placement)

    placements.sort(key=lambda p: (p.model, p.replica))
    refusals.sort(key=lambda r: (r.model, r.replica))
    return Plan(tuple(placements), tuple(refusals))


class PlacementBook:
    """The models placed so far and the plan that placed them. Each model is planned with the others' placements
    kept (``plan_placement``'s ``previous``); a forgotten (unloaded) model gives its devices back at the next plan.
    Not thread safe: the manager calls it under its registry lock."""

    def __init__(self) -> None:
        self._demands: dict[str, ModelDemand] = {}
        self._plan: Plan | None = None

    def place(self, demand: ModelDemand, devices: Sequence[Device]) -> list[Placement]:
        """``demand``'s replicas, planned beside everything placed; ``PlacementError`` (and nothing kept) when they
        do not fit."""
        demands = {**self._demands, demand.name: demand}
        plan = plan_placement(demands.values(), devices, previous=self._plan)
        refused = [r for r in plan.refusals if r.model == demand.name]
        if refused:
            raise PlacementError(refused)
        self._demands, self._plan = demands, plan
        return plan.replicas_of(demand.name)

    def forget(self, model: str) -> None:
        self._demands.pop(model, None)

    def _placed(self) -> list[Placement]:
        if self._plan is None:
            return []
        return [p for p in self._plan.placements if p.model in self._demands]

    def replicas(self) -> dict[str, list[str]]:
        """Each placed model's replicas, their devices joined by ``+`` (``{"chat": ["cuda:0", "cuda:1+cuda:2"]}``)."""
        out: dict[str, list[str]] = {}
        for p in self._placed():
            out.setdefault(p.model, []).append("+".join(p.devices))
        return dict(sorted(out.items()))

    def models_on(self) -> dict[str, list[str]]:
        """Per device, the models with a replica (or a rank of one) on it."""
        out: dict[str, set[str]] = {}
        for p in self._placed():
            for device in p.devices:
                out.setdefault(device, set()).add(p.model)
        return {device: sorted(models) for device, models in out.items()}

    def models_using(self, device: str) -> list[str]:
        return self.models_on().get(device, [])
