"""A node's fence agent as the database keeps it (model/fence.py): what is accepted, what the agent reads on its
standard input, and what is masked wherever a node is shown."""

from __future__ import annotations

import pytest

from deckard.model.errors import BadInput
from deckard.model.fence import MASK, fence_config, is_secret, masked_options, parse_options, stored_fence


def test_the_agent_reads_the_action_then_its_options_one_per_line() -> None:
    config = fence_config("fence_ipmilan", {"ip": "10.0.9.2", "lanplus": True, "ipport": 623, "password": "p=w d"})
    assert config.stdin("off") == b"action=off\nip=10.0.9.2\nipport=623\nlanplus=1\npassword=p=w d\n"
    assert config.stdin("status").startswith(b"action=status\n")


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("password", True),
        ("passwd", True),
        ("snmp_priv_passwd", True),
        ("community", True),
        ("api_token", True),
        ("password_script", False),  # a path to a program that prints it: not the secret itself
        ("username", False),
        ("ip", False),
    ],
)
def test_secrets_are_told_by_their_name(key: str, secret: bool) -> None:
    assert is_secret(key) is secret


def test_secrets_are_masked_and_nothing_else() -> None:
    shown = masked_options({"ip": "10.0.9.2", "password": "hunter2", "password_script": "/usr/local/bin/pw"})
    assert shown == {"ip": "10.0.9.2", "password": MASK, "password_script": "/usr/local/bin/pw"}


@pytest.mark.parametrize(
    ("agent", "options", "code"),
    [
        ("rm", {}, "bad_fence_agent"),
        ("fence_ipmilan; reboot", {}, "bad_fence_agent"),
        ("/usr/sbin/fence_ipmilan", {}, "bad_fence_agent"),  # a name looked up on PATH, not a path
        ("fence_ipmilan", {"action": "on"}, "bad_fence_option"),  # chosen by Deckard for each call
        ("fence_ipmilan", {"nodename": "x"}, "bad_fence_option"),
        ("fence_ipmilan", {"ip": "10.0.0.1\naction=on"}, "bad_fence_option"),  # one line: no smuggled action
        ("fence_ipmilan", {"IP": "10.0.0.1"}, "bad_fence_option"),
        ("fence_ipmilan", {"ip": "x" * 1025}, "bad_fence_option"),
        ("fence_ipmilan", {f"k{i}": "v" for i in range(33)}, "bad_fence_option"),
        ("fence_ipmilan", {"ip": ["10.0.0.1"]}, "bad_fence_option"),
    ],
)
def test_a_bad_agent_or_option_is_refused_saying_which(agent: str, options: dict[str, object], code: str) -> None:
    with pytest.raises(BadInput) as e:
        fence_config(agent, options)
    assert e.value.code == code


def test_cli_options_are_key_value_pairs_and_never_a_secret() -> None:
    assert parse_options(["ip=10.0.9.2", "login_timeout=1", "x="]) == {"ip": "10.0.9.2", "login_timeout": "1", "x": ""}
    with pytest.raises(BadInput, match="not KEY=VALUE"):
        parse_options(["lanplus"])
    with pytest.raises(BadInput, match="--password-file"):
        parse_options(["password=hunter2"])


def test_a_row_without_an_agent_has_no_fence_config() -> None:
    assert stored_fence("", {"ip": "1"}) is None
    assert stored_fence("fence_ipmilan", {"ipport": 623}).options == {"ipport": "623"}  # type: ignore[union-attr]
