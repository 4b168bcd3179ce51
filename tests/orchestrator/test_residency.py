"""The resident-weights planner: properties that hold for any set of loaded models."""

from hypothesis import given
from hypothesis import strategies as st

from orchestrator.residency import Resident, plan_room

residents = st.lists(
    st.builds(Resident, name=st.uuids().map(str), weights_bytes=st.integers(1, 1000), evictable=st.booleans(),
              last_used=st.floats(0, 1e6)),
    max_size=12, unique_by=lambda r: r.name,
)


@given(needed=st.integers(1, 2000), budget=st.integers(1, 5000), loaded=residents)
def test_a_plan_that_fits_fits_and_evicts_only_the_oldest_evictable_needed(needed, budget, loaded):
    plan = plan_room(needed, budget, loaded)
    by_name = {r.name: r for r in loaded}
    victims = [by_name[v] for v in plan.victims]
    assert all(v.evictable for v in victims)
    after = sum(r.weights_bytes for r in loaded) - sum(v.weights_bytes for v in victims)
    evictable = sorted((r for r in loaded if r.evictable), key=lambda r: r.last_used)
    assert victims == evictable[: len(victims)], "oldest first"
    if plan.fits:
        assert after + needed <= budget
        if victims:  # one fewer would not have fitted
            assert after + victims[-1].weights_bytes + needed > budget
    else:
        assert victims == [] and plan.pinned_bytes + needed > budget


def test_no_budget_means_no_eviction():
    loaded = [Resident("a", 10, True, 0.0)]
    assert plan_room(10**12, None, loaded).victims == ()
