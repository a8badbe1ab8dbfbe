"""The pure rules of tenant networks (``model/network.py``): which ranges a network may have, which overlap, and the
VXLAN id its segment gets on the nodes."""

from __future__ import annotations

import pytest

from deckard.model.errors import BadInput
from deckard.model.network import overlapping, validate_range


@pytest.mark.parametrize(
    "text,normalised",
    [
        ("10.1.0.0/24", "10.1.0.0/24"),
        (" 172.16.0.0/16 ", "172.16.0.0/16"),
        ("192.168.7.0/28", "192.168.7.0/28"),
        ("100.64.0.0/16", "100.64.0.0/16"),
    ],
)
def test_a_private_range_of_16_to_28_bits_is_accepted_normalised(text: str, normalised: str) -> None:
    assert validate_range(text) == normalised


@pytest.mark.parametrize(
    "text",
    [
        "8.8.8.0/24",  # public
        "10.0.0.0/8",  # too wide
        "10.1.0.0/30",  # too narrow for desktops after the node addresses
        "10.1.0.5/24",  # host bits set: the administrator meant something else
        "fd00::/64",  # IPv6
        "100.128.0.0/16",  # outside 100.64.0.0/10
        "172.32.0.0/16",  # outside 172.16.0.0/12
        "garbage",
        "",
    ],
)
def test_other_ranges_are_refused_with_bad_network_range_saying_what_is_allowed(text: str) -> None:
    with pytest.raises(BadInput) as e:
        validate_range(text)
    assert e.value.code == "bad_network_range" and e.value.status == 422
    assert "/16 to /28" in e.value.message and "192.168.0.0/16" in e.value.message


def test_overlapping_names_the_first_network_sharing_an_address() -> None:
    others = {"a": "10.1.0.0/24", "b": "10.2.0.0/16", "c": "10.3.0.0/24"}
    assert overlapping("10.2.5.0/24", others) == "b"
    assert overlapping("10.0.0.0/14", others) == "a"  # wider, holding all three: the first
    assert overlapping("10.4.0.0/24", others) is None
    assert overlapping("10.4.0.0/24", {}) is None
