"""The launcher's restart budget and backoff (scalellm/launcher/restarts.py), on a clock the test
moves: a child that keeps dying at once is restarted after doubling, capped delays until its
streak uses up the budget; one that ran long enough before dying starts a new streak."""

from __future__ import annotations

from typing import Any

import pytest

from scalellm.launcher.restarts import RestartPolicy, Restarts


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_crash_loop_backs_off_exponentially_and_then_gives_up() -> None:
    clock = Clock()
    restarts = Restarts(RestartPolicy(budget=5, initial_s=0.5, max_s=4.0, stable_s=60.0), clock)
    restarts.started("gateway")
    delays = []
    while (delay := restarts.died("gateway")) is not None:
        assert restarts.pending("gateway") and not restarts.due("gateway")
        clock.now += delay - 0.01
        assert not restarts.due("gateway")  # not a moment before its delay
        clock.now += 0.01
        assert restarts.due("gateway")
        restarts.started("gateway")
        assert not restarts.pending("gateway")
        delays.append(delay)
        clock.now += 1.0  # it dies a second after each start
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0]  # doubling, capped at max_s
    assert restarts.streak("gateway") == 5


def test_a_child_that_ran_long_enough_starts_a_new_streak() -> None:
    clock = Clock()
    restarts = Restarts(RestartPolicy(budget=2, initial_s=1.0, max_s=8.0, stable_s=30.0), clock)
    restarts.started("redis")
    assert restarts.died("redis") == 1.0
    restarts.started("redis")
    assert restarts.died("redis") == 2.0  # died at once: the streak goes on
    restarts.started("redis")
    clock.now += 30.0  # then it served for a while
    assert restarts.died("redis") == 1.0 and restarts.streak("redis") == 1
    restarts.started("redis")
    assert restarts.died("redis") == 2.0
    restarts.started("redis")
    assert restarts.died("redis") is None  # two quick deaths in a row after the reset: give up


def test_streaks_are_per_child_and_a_zero_budget_never_restarts() -> None:
    clock = Clock()
    restarts = Restarts(RestartPolicy(budget=1), clock)
    for name in ("kvstore", "decode-1"):
        restarts.started(name)
    assert restarts.died("kvstore") == 0.5
    assert restarts.died("decode-1") == 0.5  # its own streak
    assert not restarts.pending("prefill-1") and not restarts.due("prefill-1")
    off = Restarts(RestartPolicy(budget=0), clock)
    off.started("gateway")
    assert off.died("gateway") is None


@pytest.mark.parametrize(
    "fields", [{"budget": -1}, {"initial_s": 2.0, "max_s": 1.0}, {"initial_s": -1.0}, {"stable_s": 0.0}]
)
def test_a_bad_policy_is_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RestartPolicy(**fields)
