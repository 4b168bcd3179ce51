"""The placement planner's properties, over generated fleets and model sets."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.placement import Device, ModelDemand, PlacementError, Plan, plan_placement

GIB = 1024**3


@st.composite
def devices(draw: st.DrawFn, min_size: int = 1) -> list[Device]:
    count = draw(st.integers(min_size, 8))
    fleet = []
    for index in range(count):
        total = draw(st.integers(1, 80)) * GIB
        free = draw(st.integers(0, total // GIB)) * GIB
        fleet.append(
            Device(
                id=f"cuda:{index}",
                total_bytes=total,
                free_bytes=free,
                healthy=draw(st.booleans()) or index == 0,
                cordoned=draw(st.sampled_from([False, False, False, True])),
                utilisation=draw(st.floats(0.0, 1.0)),
            )
        )
    return fleet


@st.composite
def models(draw: st.DrawFn) -> list[ModelDemand]:
    count = draw(st.integers(1, 5))
    return [
        ModelDemand(
            name=f"m{index}",
            weight_bytes=draw(st.integers(0, 60 * GIB)),
            kv_budget_bytes=draw(st.integers(0, 8 * GIB)),
            tensor_parallel=draw(st.sampled_from([1, 1, 2, 4])),
            pipeline_parallel=draw(st.sampled_from([1, 1, 2])),
            replicas=draw(st.integers(1, 3)),
        )
        for index in range(count)
    ]


def check_plan(plan: Plan, demands: list[ModelDemand], fleet: list[Device]) -> None:
    by_id = {d.id: d for d in fleet}
    for device, used in plan.used_bytes().items():
        assert by_id[device].usable
        assert used <= by_id[device].free_bytes, f"{device} promised {used} of {by_id[device].free_bytes}"
    for p in plan.placements:
        demand = next(m for m in demands if m.name == p.model)
        assert len(p.devices) == demand.tensor_parallel * demand.pipeline_parallel
        assert len(set(p.devices)) == len(p.devices), "a replica's ranks share a device"
    for demand in demands:
        if demand.devices_per_replica > 1:
            held = [d for p in plan.replicas_of(demand.name) for d in p.devices]
            assert len(held) == len(set(held)), f"multi-device replicas of {demand.name} share a device: {plan}"
    # Every replica is either placed or refused, never both, never forgotten.
    placed = {(p.model, p.replica) for p in plan.placements}
    refused = {(r.model, r.replica) for r in plan.refusals}
    wanted = {(m.name, r) for m in demands for r in range(m.replicas)}
    assert placed | refused == wanted
    assert not placed & refused


@settings(max_examples=200, deadline=None)
@given(models(), devices())
def test_never_over_memory_and_every_replica_accounted_for(demands: list[ModelDemand], fleet: list[Device]) -> None:
    check_plan(plan_placement(demands, fleet), demands, fleet)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 4), st.sampled_from([1, 2]), st.integers(1, 8), st.integers(1, 20))
def test_replicas_land_on_distinct_devices_when_there_are_enough(
    replicas: int, tp: int, device_count: int, gib: int
) -> None:
    fleet = [Device(f"cuda:{i}", 80 * GIB, 40 * GIB) for i in range(device_count)]
    demand = ModelDemand("m", gib * GIB, tensor_parallel=tp, replicas=replicas)
    plan = plan_placement([demand], fleet)
    check_plan(plan, [demand], fleet)
    if replicas * tp <= device_count:
        assert not plan.refusals
        used = [d for p in plan.placements for d in p.devices]
        assert len(used) == len(set(used)), f"replicas share a device although {device_count} were free: {plan}"


@settings(max_examples=200, deadline=None)
@given(models(), devices(min_size=2), st.data())
def test_a_lost_device_moves_only_its_replicas(
    demands: list[ModelDemand], fleet: list[Device], data: st.DataObject
) -> None:
    before = plan_placement(demands, fleet)
    lost = data.draw(st.sampled_from([d.id for d in fleet]))
    mode = data.draw(st.sampled_from(["healthy", "cordoned"]))
    after_fleet = [dataclasses.replace(d, **{mode: mode == "cordoned"}) if d.id == lost else d for d in fleet]
    after = plan_placement(demands, after_fleet, previous=before)
    check_plan(after, demands, after_fleet)
    assert all(lost not in p.devices for p in after.placements)
    for p in before.placements:
        if lost not in p.devices:
            assert after.get(p.model, p.replica) == p, "a placement off the lost device moved"
        else:
            assert after.get(p.model, p.replica) is not None or any(
                (r.model, r.replica) == (p.model, p.replica) for r in after.refusals
            )


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 4), st.sampled_from([(2, 1), (1, 2), (2, 2), (4, 1)]), devices(min_size=2), st.integers(1, 30))
def test_multi_device_replicas_get_their_own_devices_or_are_refused(
    replicas: int, layout: tuple[int, int], fleet: list[Device], gib: int
) -> None:
    tp, pp = layout
    demand = ModelDemand("m", gib * GIB, GIB, tensor_parallel=tp, pipeline_parallel=pp, replicas=replicas)
    plan = plan_placement([demand, ModelDemand("small", GIB, replicas=2)], fleet)
    check_plan(plan, [demand, ModelDemand("small", GIB, replicas=2)], fleet)
    fitting = [d for d in fleet if d.usable and d.free_bytes >= demand.bytes_per_device]
    # Each placed replica holds tp x pp devices no other replica of it holds, so at most this many are placed.
    assert len(plan.replicas_of("m")) <= len(fitting) // (tp * pp)
    for refusal in plan.refusals:
        if refusal.model == "m" and refusal.replica > 0 and plan.replicas_of("m"):
            assert "not held by its other replicas" in refusal.message


@settings(max_examples=100, deadline=None)
@given(models(), devices())
def test_adding_a_model_keeps_existing_placements(demands: list[ModelDemand], fleet: list[Device]) -> None:
    before = plan_placement(demands, fleet)
    added = demands + [ModelDemand("added", 1 * GIB)]
    after = plan_placement(added, fleet, previous=before)
    check_plan(after, added, fleet)
    for p in before.placements:
        assert after.get(p.model, p.replica) == p


def test_least_loaded_device_first() -> None:
    fleet = [
        Device("cuda:0", 80 * GIB, 80 * GIB, utilisation=0.9),
        Device("cuda:1", 80 * GIB, 80 * GIB, utilisation=0.1),
        Device("cuda:2", 80 * GIB, 80 * GIB, utilisation=0.5),
    ]
    plan = plan_placement([ModelDemand("a", GIB), ModelDemand("b", GIB)], fleet)
    assert {plan.get("a", 0).devices, plan.get("b", 0).devices} == {("cuda:1",), ("cuda:2",)}


def test_a_refusal_says_what_is_short() -> None:
    fleet = [Device("cuda:0", 24 * GIB, 20 * GIB), Device("cuda:1", 24 * GIB, 10 * GIB, cordoned=True)]
    plan = plan_placement([ModelDemand("big", 30 * GIB, 2 * GIB, tensor_parallel=2)], fleet)
    assert not plan.placements
    with pytest.raises(PlacementError) as caught:
        plan.raise_if_refused()
    message = str(caught.value)
    assert "'big'" in message and str(16 * GIB) in message and "2 usable device(s)" in message
    assert "only 1" in message


def test_a_replica_past_the_new_count_is_dropped_on_replan() -> None:
    fleet = [Device(f"cuda:{i}", 10 * GIB, 10 * GIB) for i in range(3)]
    before = plan_placement([ModelDemand("m", GIB, replicas=3)], fleet)
    after = plan_placement([ModelDemand("m", GIB, replicas=2)], fleet, previous=before)
    assert [p.replica for p in after.replicas_of("m")] == [0, 1]
    assert after.replicas_of("m") == before.replicas_of("m")[:2]


@pytest.mark.parametrize(
    "kwargs", [{"weight_bytes": -1}, {"tensor_parallel": 0}, {"replicas": 0}, {"pipeline_parallel": 0}]
)
def test_bad_demands_are_refused(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="'m'"):
        ModelDemand("m", **{"weight_bytes": 1, **kwargs})
