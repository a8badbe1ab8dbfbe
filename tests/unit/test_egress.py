"""Egress policies: parsing, the decision ``explain-network`` gives, and the nftables text the node loads."""

from __future__ import annotations

import ipaddress

import pytest

from deckard.drivers.firewall import Table, policy_chain
from deckard.model.egress import Protected, decide, opens_farm, parse_forbidden, parse_policy
from deckard.model.errors import BadInput

IP = ipaddress.IPv4Address
NET = ipaddress.IPv4Network

FARM = Protected(
    NET("10.231.0.0/22"),
    IP("10.231.0.1"),
    ((NET("192.168.50.2/32"), "node n2"), (NET("192.168.50.9/32"), "the farm's database")),
    (NET("172.16.0.0/12"),),
)


def test_a_policy_parses_in_order_with_comments_and_both_separators() -> None:
    rules = parse_policy("deny tcp any port 25  # no mail\nallow tcp 10.20.0.0/16 port 443,8000-8080; deny 10.0.0.0/8")
    assert [r.text for r in rules] == [
        "deny tcp any port 25",
        "allow tcp 10.20.0.0/16 port 443,8000-8080",
        "deny 10.0.0.0/8",
    ]
    assert parse_policy("") == ()
    assert parse_policy("allow 1.2.3.4")[0].text == "allow 1.2.3.4"


@pytest.mark.parametrize(
    "text",
    [
        "permit any",  # not a verb
        "allow",  # no destination
        "allow 10.0.0.1/8",  # host bits set
        "allow 300.0.0.1",
        "allow any port 80",  # ports without tcp/udp
        "allow icmp any port 80",
        "deny tcp any port 0",
        "deny tcp any port 90-80",
        "deny tcp any port 70000",
        "deny tcp any port",
        "deny tcp any port 80 extra",
        "allow fe80::/10",  # IPv6: desktops have none
        "; ".join(["deny any"] * 65),  # too many rules
        "deny tcp any port " + ",".join(str(p) for p in range(1, 30)),
        "x" * 5000,
    ],
)
def test_bad_policies_are_refused_with_one_code_saying_what_is_wrong(text: str) -> None:
    with pytest.raises(BadInput) as e:
        parse_policy(text)
    assert e.value.code == "bad_egress_policy" and e.value.message


def test_the_first_matching_rule_decides_and_no_match_is_allowed() -> None:
    rules = parse_policy("deny tcp any port 25; allow tcp 10.20.0.0/16 port 443; deny 10.0.0.0/8")
    smtp = decide(rules, FARM, IP("8.8.8.8"), "tcp", 25, source="tenant")
    assert not smtp.allowed and smtp.index == 1 and smtp.decided_by == "rule" and smtp.source == "tenant"
    assert decide(rules, FARM, IP("10.20.1.1"), "tcp", 443).index == 2
    intranet = decide(rules, FARM, IP("10.20.1.1"), "tcp", 22)
    assert not intranet.allowed and intranet.rule == "deny 10.0.0.0/8" and intranet.index == 3
    web = decide(rules, FARM, IP("93.184.216.34"), "tcp", 443)
    assert web.allowed and web.decided_by == "default"
    assert decide(rules, FARM, IP("8.8.8.8"), "udp", 25).allowed  # the smtp rule is tcp only


def test_the_farm_is_never_reachable_whatever_the_policy() -> None:
    rules = parse_policy("allow any")
    for dest, words in [
        ("10.231.0.77", "desktop network"),
        ("192.168.50.2", "node n2"),
        ("192.168.50.9", "database"),
        ("172.20.1.1", "network.egress.forbidden"),
    ]:
        v = decide(rules, FARM, IP(dest), "tcp", 443)
        assert not v.allowed and v.decided_by == "farm" and words in v.reason, (dest, v)
    assert decide(rules, FARM, IP("10.231.0.1"), "udp", 53).decided_by == "resolver"
    node = decide(rules, FARM, IP("10.231.0.1"), "tcp", 9443)
    assert not node.allowed and "this node" in node.reason


def test_an_allow_rule_that_only_targets_the_farm_is_found() -> None:
    assert opens_farm(parse_policy("allow 10.231.0.0/24"), FARM) is not None
    assert opens_farm(parse_policy("allow tcp 192.168.50.9 port 5432"), FARM) is not None
    assert opens_farm(parse_policy("allow 10.0.0.0/8; allow any; deny 10.231.0.5"), FARM) is None


def test_forbidden_networks_parse_and_any_is_refused() -> None:
    assert parse_forbidden("10.1.0.0/16, 192.168.0.1") == (NET("10.1.0.0/16"), NET("192.168.0.1/32"))
    with pytest.raises(BadInput):
        parse_forbidden("any")


def test_the_filter_text_has_one_chain_per_distinct_policy_and_every_desktop_in_the_map() -> None:
    web = parse_policy("deny tcp any port 25; allow tcp 10.20.0.0/16 port 443,8000-8080; deny 10.0.0.0/8")
    text = Table("deckard0", FARM, {"10.231.0.11": web, "10.231.0.12": web, "10.231.0.13": ()}).render()
    assert text.startswith("table inet deckard_deckard0\ndelete table inet deckard_deckard0\n")
    assert text.count(f"chain {policy_chain(web)} {{") == 1 and text.count(f"chain {policy_chain(())} {{") == 1
    assert f"10.231.0.11 : jump {policy_chain(web)}" in text and f"10.231.0.13 : jump {policy_chain(())}" in text
    chain = text.split(f"chain {policy_chain(web)} {{")[1].split("}\n", 1)[0]
    lines = [line.strip() for line in chain.strip().splitlines()]
    assert lines == [
        "tcp dport { 25 } reject with icmpx type admin-prohibited",
        "ip daddr 10.20.0.0/16 tcp dport { 443, 8000-8080 } accept",
        "ip daddr 10.0.0.0/8 reject with icmpx type admin-prohibited",
        "accept",
    ]
    for net in ("10.231.0.0/22", "192.168.50.2", "192.168.50.9", "172.16.0.0/12"):
        assert net in text.split("set farm")[1].split("\n")[0]
    assert 'ip saddr 10.231.0.0/22 oifname != "deckard0" masquerade' in text


def test_on_the_overlay_a_nodes_call_and_its_replies_pass_before_the_desktops_policy() -> None:
    plain = Table("deckard0", FARM, {}).render()
    text = Table("deckard0", FARM, {}, overlay=True).render()
    assert "ct mark" not in plain
    forward = text.split("chain forward {")[1].split("}")[0].strip().splitlines()
    # the overlay's bridge filter marks what a node sent through the VXLAN port; the connection keeps the mark
    assert [line.strip() for line in forward[1:3]] == [
        "meta mark 0x6b76 ct mark set 0x6b76 accept",
        "ct mark 0x6b76 accept",
    ]
    assert forward[3].strip() == 'iifname "deckard0" jump from_desktop'


async def test_a_stopped_desktops_policy_stays_loaded_so_its_restart_only_adds_its_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Loading the whole table took 15-20 ms of a CPU beside a guest's boot; a restart with the same policy (the
    most common start) adds one element instead, once the stopped desktop's address has left the table."""
    from deckard.drivers import firewall
    from deckard.node import egress
    from deckard.runtime.settings import Settings

    web = parse_policy("deny tcp any port 25")
    view: dict[str, tuple] = {"10.231.0.11": web}
    loads: list[str] = []
    added: list[str] = []

    async def node_view(*_: object) -> tuple[Protected, dict[str, tuple]]:
        return FARM, dict(view)

    async def load(_bridge: str, text: str) -> None:
        loads.append(text)

    async def add_desktop(_bridge: str, ip: str, chain: str) -> None:
        added.append(f"{ip} : jump {chain}")

    monkeypatch.setattr(egress.network_policy, "node_view", node_view)
    monkeypatch.setattr(firewall, "load", load)
    monkeypatch.setattr(firewall, "add_desktop", add_desktop)
    node = egress.Egress(None, Settings())  # type: ignore[arg-type]  # the database is only read by node_view
    await node.refresh(1)
    assert "10.231.0.11 : jump" in loads[-1]
    view.clear()  # the desktop stopped
    await node.refresh(1)
    assert "10.231.0.11" not in loads[-1] and f"chain {policy_chain(web)} {{" in loads[-1]
    before = len(loads)
    await node.admit("10.231.0.11", web)
    assert added == [f"10.231.0.11 : jump {policy_chain(web)}"] and len(loads) == before
    await node.admit("10.231.0.12", parse_policy("deny tcp any port 26"))  # a policy not loaded: the whole table
    assert len(loads) == before + 1 and "10.231.0.12 : jump" in loads[-1]
