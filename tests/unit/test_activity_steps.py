"""The activity chart's steps (``services/activity.points``) and when a node samples (``node/activity``)."""

from __future__ import annotations

from deckard.node.activity import SPREAD_S, seconds_to_next_try
from deckard.services.activity import MAX_POINTS, Sample, points


def test_a_young_farm_has_a_point_a_minute_and_a_week_of_minutes_stays_within_the_bound() -> None:
    assert points([], now=1000.0) == {"step_s": 60, "points": []}
    one = points([Sample(600.0, 2, 1, 1)], now=630.0)
    assert one["step_s"] == 60 and [(p["running"], p["connected"], p["nodes"]) for p in one["points"]] == [(2, 1, 1)]
    week = [Sample(60.0 * m, m % 5, 0, 1) for m in range(7 * 1440)]
    out = points(week, now=60.0 * 7 * 1440)
    assert out["step_s"] == 60 * 35 and len(out["points"]) <= MAX_POINTS
    assert {p["running"] for p in out["points"]} == {4}  # each step's highest


def test_each_node_tries_once_a_minute_a_moment_after_it_begins() -> None:
    for node_id in (1, 2, 7, 1000):
        for now in (120.0, 120.4, 150.0, 179.99):
            wait = seconds_to_next_try(node_id, now)
            at = now + wait
            assert 180.5 <= at <= 180 + SPREAD_S, (node_id, now, at)  # the next minute, in its first seconds
