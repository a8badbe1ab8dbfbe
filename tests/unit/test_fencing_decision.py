"""The self-fencing rule (node/fencing.py ``decide``): when a node kills its own guests, and when it must not."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deckard.node.fencing import LivenessFacts, Verdict, decide
from deckard.services.cluster import LeaseView

LEASE = 6.0


def facts(since_ok_s: float, view: LeaseView | None, peers_known: int = 0) -> LivenessFacts:
    return LivenessFacts(since_ok_s=since_ok_s, view=view, peers_known=peers_known, self_fence_after_s=LEASE)


def test_a_node_alone_keeps_its_guests_however_long_the_database_is_away() -> None:
    assert decide(facts(3600.0, None, peers_known=0)).verdict is Verdict.KEEP


def test_a_node_alone_keeps_its_guests_when_the_database_shows_its_lease_lapsed() -> None:
    assert decide(facts(30.0, LeaseView("running", 30.0, peers=0))).verdict is Verdict.KEEP


def test_a_cut_off_node_with_a_peer_fences_when_its_lease_ends() -> None:
    assert decide(facts(LEASE - 0.1, None, peers_known=1)).verdict is Verdict.KEEP
    decision = decide(facts(LEASE, None, peers_known=1))
    assert decision.verdict is Verdict.FENCE
    assert "may take over" in decision.reason


def test_a_slow_write_does_not_fence_while_the_database_holds_the_lease() -> None:
    """Our own clock says the lease ran out (the write hung), but the database still has a recent heartbeat."""
    assert decide(facts(20.0, LeaseView("running", 2.0, peers=3), peers_known=3)).verdict is Verdict.KEEP


def test_a_lease_the_database_confirms_lapsed_fences_when_a_peer_can_take_over() -> None:
    assert decide(facts(0.5, LeaseView("running", LEASE + 0.5, peers=1))).verdict is Verdict.FENCE


def test_the_database_answer_overrides_a_stale_peer_count() -> None:
    """The peer left the farm: the fresh answer (no peers) wins over what we knew before."""
    assert decide(facts(30.0, LeaseView("running", 30.0, peers=0), peers_known=2)).verdict is Verdict.KEEP


@pytest.mark.parametrize("state", ["lost", None])
def test_a_node_declared_lost_or_removed_kills_its_guests_even_alone(state: str | None) -> None:
    assert decide(facts(0.0, LeaseView(state, 0.0, peers=0))).verdict is Verdict.LOST


@given(
    since_ok=st.floats(0, 1e4),
    age=st.floats(0, 1e4),
    peers=st.integers(0, 5),
    known=st.integers(0, 5),
    answered=st.booleans(),
    state=st.sampled_from(["starting", "running", "stopping", "restarting", "lost"]),
)
def test_guests_die_only_when_another_node_could_take_them_over_or_we_were_declared_lost(
    since_ok: float, age: float, peers: int, known: int, answered: bool, state: str
) -> None:
    view = LeaseView(state, age, peers) if answered else None
    verdict = decide(facts(since_ok, view, known)).verdict
    if verdict is Verdict.FENCE:
        assert (peers if answered else known) > 0
        assert (age if answered else since_ok) >= LEASE
    if verdict is Verdict.LOST:
        assert answered and state == "lost"
