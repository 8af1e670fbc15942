"""The planner's decisions on load traces (tests/unit/planner_traces.py): a flood that rises and
falls, a noisy steady load, a single spike, a worker death, slow start-ups and a registry outage."""

from __future__ import annotations

import itertools
import math

import pytest

from scalellm.planner import Change, Planner, PlannerPolicy, Signal, Tier, TierLimits, TierLoad, need_of
from scalellm.registry import WorkerRole
from tests.unit.planner_traces import (
    SimulatedMesh,
    decode_workers,
    noisy,
    ramp,
    record,
    view,
)

POLICY = PlannerPolicy()  # the defaults: interval 5 s, up window 30 s, down window 120 s, ...


def _planner(decode: tuple[int, int] = (1, 4), prefill: tuple[int, int] = (1, 1), **policy: float) -> Planner:
    limits = {Tier.DECODE: TierLimits(*decode), Tier.PREFILL: TierLimits(*prefill)}
    return Planner(PlannerPolicy(**policy), limits)  # type: ignore[arg-type]


# ---------------------------------------------------------------- signals


def test_need_follows_the_largest_signal() -> None:
    # The module doc's example: 2 workers of batch 8 holding 14 + 10 sequences, target 0.75.
    load = TierLoad.of([record("d1", running=8, waiting=6), record("d2", running=8, waiting=2)])
    need = need_of(load, POLICY)
    assert load.occupancy == 1.5 and need.driver is Signal.OCCUPANCY and need.replicas == pytest.approx(4.0)

    full_kv = TierLoad.of([record("d1", running=1, free=100)])  # 90 % of the blocks used
    assert need_of(full_kv, POLICY).driver is Signal.KV_USAGE
    assert need_of(full_kv, POLICY).replicas == pytest.approx(0.9 / 0.8)

    prefill = TierLoad.of([record("p1", WorkerRole.PREFILL, backlog=12288), record("p2", WorkerRole.PREFILL)])
    assert need_of(prefill, POLICY).driver is Signal.BACKLOG and need_of(prefill, POLICY).replicas == 3.0
    assert prefill.kv_usage == 0.0  # prefill workers hold no KV for long: not a signal for them


def test_latency_targets_count_only_when_set_and_only_where_they_apply() -> None:
    slow = [record("d1", running=1, itl=0.2), record("d2", running=1, itl=0.1), record("d3", running=1)]
    off = need_of(TierLoad.of(slow), POLICY)
    assert Signal.ITL not in dict(off.ratios)
    on = need_of(TierLoad.of(slow), PlannerPolicy(target_itl_s=0.05, target_ttft_s=0.1))
    assert on.driver is Signal.ITL and on.replicas == pytest.approx(3 * 0.15 / 0.05)  # mean of those measured
    assert dict(on.ratios)[Signal.TTFT] == 0.0  # decode workers' TTFT includes the remote prefill: not theirs
    both = TierLoad.of([record("b1", WorkerRole.BOTH, ttft=0.3)])
    assert need_of(both, PlannerPolicy(target_ttft_s=0.1)).driver is Signal.TTFT


def test_an_empty_tier_and_workers_without_reports_need_nothing() -> None:
    assert need_of(TierLoad.of([]), POLICY).replicas == 0.0
    fresh = record("d1", batch=0)  # registered, no batch limit reported, nothing running
    assert need_of(TierLoad.of([fresh]), POLICY).driver is None


# ---------------------------------------------------------------- decisions on traces


def test_a_flood_scales_decode_up_step_by_step_and_back_down_after_it() -> None:
    """Demand rises from 4 sequences to 40 (the need grows past 4 workers of batch 8), holds,
    then falls back; workers take 20 s to register."""
    demand = ramp([(0, 4), (60, 4), (240, 40), (600, 40), (700, 4)])
    mesh = SimulatedMesh(_planner(), demand)
    mesh.run(until=2400)
    changes = mesh.times_of_changes(Tier.DECODE)
    counts = [c for _, c in changes]
    peak = counts.index(4)
    assert counts[0] == 1 and counts[-1] == 1 and max(counts) == 4
    assert counts[: peak + 1] == sorted(counts[: peak + 1]) and counts[peak:] == sorted(
        counts[peak:], reverse=True
    )
    steps = [b - a for a, b in itertools.pairwise(counts)]
    assert all(0 < s <= POLICY.max_step_up for s in steps[:peak])
    assert all(s == -1 for s in steps[peak:])  # down one at a time
    first_up = changes[1][0]
    assert 60 + POLICY.up_window_s <= first_up < 240  # sustained for the window, long before the peak
    assert changes[peak][0] < 600  # at the maximum while the flood holds
    first_down = changes[peak + 1][0]
    # Only once the need stayed at or below what 3 workers carry at 80 % for a whole window:
    low_since = min(t for t, p in mesh.history if t > 600 and p[Tier.DECODE].need.replicas <= 3 * 0.8)
    assert first_down == low_since + POLICY.down_window_s
    times = [t for t, _ in changes]
    gaps = [b - a for a, b in itertools.pairwise(times[peak:])]
    assert all(g >= POLICY.down_cooldown_s for g in gaps)
    assert mesh.desired(Tier.PREFILL) == [1] * len(mesh.history)  # prefill held at its only size


def test_a_noisy_steady_load_moves_nothing() -> None:
    """10 sequences +-40 % on 2 workers: the need jumps between 1.1 and 2.3 every interval, so a
    planner without hysteresis would flap; this one keeps 2 for an hour."""
    planner = _planner()
    mesh = SimulatedMesh(planner, noisy(10, 0.4), live={Tier.DECODE: 2, Tier.PREFILL: 1})
    mesh.run(until=3600)
    assert set(mesh.desired(Tier.DECODE)) == {2}
    naive = [math.ceil(plans[Tier.DECODE].need.replicas) for _, plans in mesh.history]
    assert {1, 2, 3} <= set(naive)  # the trace really is noisy around the thresholds


@pytest.mark.parametrize("length_s", [0, 5, 25])
def test_a_spike_shorter_than_the_up_window_moves_nothing(length_s: int) -> None:
    steady, spike_at = 4.0, 300.0
    demand = lambda t: 80.0 if spike_at <= t <= spike_at + length_s else steady  # noqa: E731
    mesh = SimulatedMesh(_planner(), demand)
    mesh.run(until=900)
    assert set(mesh.desired(Tier.DECODE)) == {1}
    spiked = [plans[Tier.DECODE].need.replicas for t, plans in mesh.history if t == spike_at]
    assert spiked and spiked[0] > 10  # the spike was seen, and ignored


def test_a_worker_death_changes_nothing_while_its_load_fits_the_rest() -> None:
    """3 workers carry 15 sequences (need 2.5); one dies at 100 s and comes back at 400 s (the
    launcher or Kubernetes restarts it). Its load moves to the others: the need stays 2.5."""
    dead = lambda t: {Tier.DECODE: 1} if 100 <= t < 400 else {}  # noqa: E731
    mesh = SimulatedMesh(_planner(), lambda t: 15.0, live={Tier.DECODE: 3, Tier.PREFILL: 1}, dead=dead)
    mesh.run(until=1200)
    assert set(mesh.desired(Tier.DECODE)) == {3}
    lives = {plans[Tier.DECODE].live for t, plans in mesh.history}
    assert lives == {2, 3}
    assert all(plans[Tier.DECODE].need.replicas == pytest.approx(2.5) for _, plans in mesh.history)


def test_a_worker_death_under_a_load_the_rest_cannot_carry_scales_up() -> None:
    """One of 2 workers dies for good while 20 sequences run (need 3.3): the tier grows to 4."""
    dead = lambda t: {Tier.DECODE: 1} if t >= 100 else {}  # noqa: E731
    planner = _planner(decode=(1, 4))
    mesh = SimulatedMesh(planner, lambda t: 20.0, live={Tier.DECODE: 2, Tier.PREFILL: 1}, dead=dead)
    mesh.run(until=600)
    assert mesh.desired(Tier.DECODE)[-1] == 4


def test_no_second_scale_up_while_the_first_workers_are_still_starting() -> None:
    """Workers take 200 s to start (a big model); the cool-down is 60 s. The planner waits for
    them instead of asking for more every minute."""
    mesh = SimulatedMesh(_planner(decode=(1, 8)), lambda t: 60.0, startup_s=200)
    mesh.run(until=190)
    assert mesh.times_of_changes(Tier.DECODE) == [(0.0, 1), (30.0, 3)]  # one step of max_step_up


def test_prefill_scales_on_its_backlog_and_decode_is_left_alone() -> None:
    backlog = ramp([(0, 0), (50, 0), (60, 20000), (400, 20000), (410, 0)])
    mesh = SimulatedMesh(_planner(prefill=(1, 3)), lambda t: 2.0, prefill_demand=backlog)
    mesh.run(until=1200)
    assert max(mesh.desired(Tier.PREFILL)) == 3 and mesh.desired(Tier.PREFILL)[-1] == 1
    assert set(mesh.desired(Tier.DECODE)) == {1}
    drivers = {p[Tier.PREFILL].need.driver for _, p in mesh.history if p[Tier.PREFILL].change is Change.UP}
    assert drivers == {Signal.BACKLOG}


def test_a_registry_outage_is_not_an_idle_mesh() -> None:
    planner = _planner(down_window_s=0, down_cooldown_s=0)
    busy = view(*decode_workers(3, 20))
    planner.observe(busy, 0.0)
    assert [p.desired for p in planner.observe(busy, 5.0)] == [3]
    for t in range(10, 300, 5):  # disconnected: the view keeps its last workers, or is empty
        assert [p.desired for p in planner.observe(view(connected=False), float(t))] == [3]
    assert [p.desired for p in planner.observe(view(), 300.0)] == [2]  # synced and empty: one step down


def test_limits_bound_every_decision_and_other_models_are_planned_apart() -> None:
    planner = _planner(decode=(2, 3), up_window_s=0, down_window_s=0)
    other = record("x-1", model="other", running=8, waiting=40)
    plans = planner.observe(view(*decode_workers(1, 0), other), 0.0)
    by_model = {p.model: p for p in plans}
    assert by_model["tiny"].desired == 2  # the minimum, though one worker is idle
    assert by_model["other"].desired == 3  # its need is 8, capped at the maximum
    assert all(p.tier is Tier.DECODE for p in plans)  # no prefill worker: no prefill plan


def test_policy_and_limits_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="down_headroom"):
        PlannerPolicy(down_headroom=1.5)
    with pytest.raises(ValueError, match="interval_s"):
        PlannerPolicy(interval_s=0)
    with pytest.raises(ValueError, match="min <= max"):
        TierLimits(3, 2)
    policy = PlannerPolicy.from_args(["--up-window-s", "2"], {"SCALELLM_PLANNER_INTERVAL_S": "0.5"})
    assert (policy.up_window_s, policy.interval_s, policy.down_window_s) == (2.0, 0.5, 120.0)


@pytest.mark.parametrize(
    ("sequences", "workers", "expected"),
    [  # batch 100, target occupancy 0.75: need = sequences / 75
        (79, 1, 1),  # need 1.05, within the up tolerance of 1 worker: stays
        (90, 1, 2),  # need 1.2, beyond it: up
        (71, 2, 2),  # need 0.95: 1 worker would run past the down headroom (0.8): stays
        (56, 2, 1),  # need 0.75: 1 worker would run at 75 % of the targets: down
    ],
)
def test_the_band_between_the_thresholds_holds(sequences: int, workers: int, expected: int) -> None:
    planner, desired = _planner(), workers
    for t in range(0, 1800, 5):
        (plan,) = (
            p
            for p in planner.observe(view(*decode_workers(desired, sequences, batch=100)), t)
            if p.tier is Tier.DECODE
        )
        if plan.change is not None:
            assert desired == workers  # at most one move, never back
        desired = plan.desired
    assert desired == expected


def test_needs_from_before_a_change_do_not_decide_the_next_one() -> None:
    """With no cool-down, the window alone spaces the steps: each step waits for a whole window of
    needs measured after the previous one."""
    planner = _planner(decode=(1, 8), up_cooldown_s=0, startup_grace_s=0, max_step_up=1)
    mesh = SimulatedMesh(planner, lambda t: 60.0, startup_s=0)
    mesh.run(until=200)
    times = [t for t, _ in mesh.times_of_changes(Tier.DECODE)][1:]
    assert len(times) >= 3 and all(b - a >= POLICY.up_window_s for a, b in itertools.pairwise(times))


def test_decisions_do_not_depend_on_samples_landing_on_the_window_edges() -> None:
    """Real intervals drift (0.25 s apart, never exactly a window apart): the windows still close."""
    planner = _planner(interval_s=0.25, up_window_s=1, down_window_s=3, up_cooldown_s=0, down_cooldown_s=3)
    t, desired, seen = 0.0, 1, []
    for sequences in [40] * 20 + [0] * 40:
        t += 0.25 + 0.013  # an interval plus the time the tick took
        (plan,) = (
            p for p in planner.observe(view(*decode_workers(desired, sequences)), t) if p.tier is Tier.DECODE
        )
        desired = plan.desired
        seen.append(desired)
    assert max(seen) == 4 and seen[-1] == 1  # up to the maximum, then down to the minimum
