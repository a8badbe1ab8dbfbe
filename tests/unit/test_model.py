"""The pure domain: transition tables, addressing and placement scoring."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deckard.model.errors import Conflict, InvalidTransition
from deckard.model.network import first_free_ip, gateway_of, mac_for_ip, prefix_len
from deckard.model.placement import NodeLoad, rank_nodes
from deckard.model.states import (
    COMMAND_ALLOWED_FROM,
    COMMAND_CLAIMED_AS,
    DESKTOP_AT_REST,
    DESKTOP_TRANSITIONS,
    DOC_BEGIN,
    DOC_END,
    MACHINES,
    NODE_COMMAND_ALLOWED_FROM,
    NODE_TRANSITIONS,
    DesktopCommand,
    DesktopState,
    Machine,
    check_command,
    check_desktop_transition,
    render_doc,
    render_tables,
    sources,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "state-machines.md"


@pytest.mark.parametrize(("old", "new"), list(itertools.product(DesktopState, DesktopState)))
def test_every_desktop_transition_is_allowed_exactly_when_the_table_says(old: DesktopState, new: DesktopState) -> None:
    if new in DESKTOP_TRANSITIONS.get(old, frozenset()):
        check_desktop_transition(old, new)
    else:
        with pytest.raises(InvalidTransition):
            check_desktop_transition(old, new)


@pytest.mark.parametrize(("cmd", "state"), list(itertools.product(DesktopCommand, DesktopState)))
def test_commands_are_accepted_only_from_their_states(cmd: DesktopCommand, state: DesktopState) -> None:
    if state in COMMAND_ALLOWED_FROM[cmd]:
        check_command(cmd, state)
    else:
        with pytest.raises(InvalidTransition) as e:
            check_command(cmd, state)
        assert e.value.code == f"cannot_{cmd}"


@pytest.mark.parametrize("machine", MACHINES, ids=lambda m: m.title)
def test_every_state_of_a_machine_has_a_row_in_its_table(machine: Machine) -> None:
    """A state missing from a table could be left by nobody: a forgotten row."""
    states = set(type(machine.initial))
    assert set(machine.transitions) == states
    assert all(targets <= states for targets in machine.transitions.values())
    assert all(allowed <= states for allowed in (machine.commands or {}).values())


def test_a_claim_moves_the_desktop_exactly_from_the_states_its_command_is_accepted_in() -> None:
    for cmd, claimed_as in COMMAND_CLAIMED_AS.items():
        assert sources(DESKTOP_TRANSITIONS, claimed_as) == COMMAND_ALLOWED_FROM[cmd]


def test_only_a_desktop_at_rest_may_be_asked_to_start_and_every_running_one_may_come_to_rest() -> None:
    assert COMMAND_ALLOWED_FROM[DesktopCommand.START] == DESKTOP_AT_REST
    held = set(DesktopState) - DESKTOP_AT_REST
    assert all(DesktopState.STOPPED in DESKTOP_TRANSITIONS[s] for s in held)  # fencing can always release
    assert not DESKTOP_TRANSITIONS[DesktopState.STOPPED] & DESKTOP_AT_REST  # no silent stopped → stopped


def test_node_commands_are_accepted_only_in_states_the_node_can_act_from() -> None:
    assert all(s in NODE_TRANSITIONS for allowed in NODE_COMMAND_ALLOWED_FROM.values() for s in allowed)


def test_the_state_machine_doc_is_generated_from_the_tables() -> None:
    """Fails when a table changed and ``python tools/state_machines_doc.py`` was not run."""
    text = DOC.read_text()
    assert render_doc(text) == text
    assert "stateDiagram-v2" in render_tables() and "| stopped | starting |" in render_tables()


def test_regenerating_the_doc_keeps_the_prose_and_is_idempotent() -> None:
    doc = f"# Title\n\nprose before\n\n{DOC_BEGIN}\nstale\n{DOC_END}\n\nprose after\n"
    once = render_doc(doc)
    assert once.startswith("# Title\n\nprose before\n\n") and once.endswith(f"{DOC_END}\n\nprose after\n")
    assert "stale" not in once and render_doc(once) == once
    assert render_doc("# Only prose\n").endswith(render_tables() + "\n")


def test_mac_is_derived_from_the_ip_like_qvd() -> None:
    assert mac_for_ip("10.231.1.12") == "54:52:00:e7:01:0c"


def test_ip_allocation_skips_node_addresses_and_used_ones() -> None:
    net = "10.9.0.0/24"
    gw = gateway_of(net)
    assert gw == "10.9.0.1" and prefix_len(net) == 24
    assert first_free_ip(net, gw, []) == "10.9.0.11"
    assert first_free_ip(net, gw, ["10.9.0.11", "10.9.0.12"]) == "10.9.0.13"


def test_a_full_network_is_a_conflict_with_a_hint() -> None:
    net = "10.9.0.0/28"
    used = [f"10.9.0.{i}" for i in range(1, 15)]
    with pytest.raises(Conflict) as e:
        first_free_ip(net, "10.9.0.1", used)
    assert e.value.code == "network_full"


@given(st.sets(st.integers(min_value=11, max_value=250), max_size=100))
def test_allocated_ip_is_never_in_use(used_octets: set[int]) -> None:
    used = [f"10.9.0.{o}" for o in used_octets]
    ip = first_free_ip("10.9.0.0/24", "10.9.0.1", used)
    assert ip not in used


def _node(i: int, **kw: object) -> NodeLoad:
    base = dict(
        node_id=i,
        name=f"n{i}",
        state="running",
        blocked=False,
        fresh=True,
        mem_free_mib=4000,
        cpus=2.0,
        load=0.0,
        desktops=0,
    )
    base.update(kw)
    return NodeLoad(**base)  # type: ignore[arg-type]


def test_placement_prefers_the_least_loaded_node_and_explains_exclusions() -> None:
    nodes = [
        _node(1, desktops=10),
        _node(2),
        _node(3, blocked=True),
        _node(4, state="lost"),
        _node(5, mem_free_mib=100),
        _node(6, fresh=False),
    ]
    ranked = rank_nodes(nodes, memory_mib=512, rng=random.Random(1))
    assert ranked[0].node.node_id == 2
    reasons = {c.node.node_id: c.excluded_by for c in ranked if c.score is None}
    assert reasons[3] == "node is blocked"
    assert reasons[4] == "node is lost"
    assert "not enough free memory" in str(reasons[5])
    assert reasons[6] == "node heartbeat is stale"
