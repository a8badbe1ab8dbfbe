"""The pure ACL model and config catalogue: pattern expansion, inheritance closure, negative grants winning,
``tenant.*`` reserved to the supertenant, cycle detection, and typed config values."""

from __future__ import annotations

import pytest

from deckard.api.audit_log import describe_action
from deckard.model.acls import ACLS, PREDEFINED_ROLES, creates_cycle, effective_acls, expand, role_closure
from deckard.model.config_keys import KEYS, config_key, parse_value
from deckard.model.errors import BadInput
from deckard.services.audit import GENESIS, mask_secrets, record_hash


def test_patterns_expand_to_catalogue_names_and_unknown_names_to_nothing() -> None:
    assert expand("desktop.start") == {"desktop.start"}
    assert "desktop.see.ip" in expand("desktop.*") and "user.see" not in expand("desktop.*")
    assert expand("*.see") >= {"desktop.see", "user.see"} and all(a.endswith(".see") for a in expand("*.see"))
    assert expand("desktop.fly") == frozenset()
    assert expand("*") == ACLS


def test_a_negative_grant_wins_over_any_positive_one() -> None:
    acls = effective_acls([("desktop.*", True), ("desktop.see.ip", False), ("desktop.see.ip", True)], supertenant=True)
    assert "desktop.see.ip" not in acls and "desktop.start" in acls


def test_tenant_acls_are_only_effective_in_the_supertenant() -> None:
    assert "tenant.create" in effective_acls([("*", True)], supertenant=True)
    assert not any(a.startswith("tenant.") for a in effective_acls([("*", True)], supertenant=False))


def test_closure_follows_inheritance_and_survives_cycles() -> None:
    parents = {3: [2], 2: [1], 1: [3]}
    assert role_closure([3], parents) == {1, 2, 3}
    assert creates_cycle(1, 3, {3: [2], 2: [1]})
    assert not creates_cycle(4, 3, {3: [2], 2: [1]})


@pytest.mark.parametrize("role", sorted(PREDEFINED_ROLES))
def test_predefined_roles_name_only_catalogue_acls(role: str) -> None:
    for pattern, _positive in PREDEFINED_ROLES[role]:
        assert expand(pattern), f"{role}: {pattern} names no ACL"


def test_read_only_role_changes_nothing() -> None:
    acls = effective_acls(PREDEFINED_ROLES["Read-only"], supertenant=False)
    assert acls and all(".see" in a for a in acls)


def test_config_values_are_checked_against_the_key_type() -> None:
    assert parse_value(config_key("tenancy.multi"), "true") is True
    assert parse_value(config_key("auth.lockout.failures"), "7") == 7
    with pytest.raises(BadInput) as e:
        parse_value(config_key("auth.lockout.failures"), "many")
    assert e.value.code == "bad_config_value"
    with pytest.raises(BadInput):
        parse_value(config_key("auth.lockout.failures"), 0)
    with pytest.raises(BadInput) as e:
        config_key("no.such.key")
    assert e.value.code == "unknown_config_key"
    for key in KEYS.values():
        assert parse_value(key, key.default) == key.default and key.description


@pytest.mark.parametrize(
    ("key", "good", "bad"),
    [
        ("placement.placer", ["qvd", "fewest", "binpack"], ["random", "QVD", "qvd;", ""]),
        ("placement.reserve", ["largest", "none", "0.25", "1", "0"], ["most", "1.5", "-0.1", "0.25 "]),
        ("users.home_on_delete", ["archive", "delete"], ["keep", "../x"]),
    ],
)
def test_text_config_keys_take_only_their_forms(key: str, good: list[str], bad: list[str]) -> None:
    """``deckard config set placement.placer …`` is accepted for what the farm reads, refused for the rest."""
    for value in good:
        assert parse_value(config_key(key), value) == value
    for value in bad:
        with pytest.raises(BadInput) as e:
            parse_value(config_key(key), value)
        assert e.value.code == "bad_config_value" and key in e.value.message


def test_secrets_are_masked_at_any_depth() -> None:
    masked = mask_secrets({"name": "bob", "password": "pw", "nested": [{"api_token": "t", "x": 1}]})
    assert masked == {"name": "bob", "password": "***", "nested": [{"api_token": "***", "x": 1}]}


def test_the_record_hash_covers_content_and_predecessor() -> None:
    import datetime as dt

    rec = {"at": dt.datetime(2026, 1, 1, tzinfo=dt.UTC), "action": "user.create", "arguments": "{}", "result": "ok"}
    h = record_hash(GENESIS, rec)
    assert h != record_hash("1" * 64, rec)
    assert h != record_hash(GENESIS, {**rec, "result": "failed"})


@pytest.mark.parametrize(
    "method,template,params,expected",
    [
        ("POST", "/api/v1/desktops/{desktop}/start", {"desktop": "7"}, ("desktop.start", "desktop", "7")),
        ("POST", "/api/v1/users", {}, ("user.create", "user", "")),
        ("PATCH", "/api/v1/users/{user}", {"user": "3"}, ("user.update", "user", "3")),
        ("DELETE", "/api/v1/osfs/{osf}", {"osf": "2"}, ("osf.delete", "osf", "2")),
        ("POST", "/api/v1/auth/login", {}, ("auth.login", "auth", "")),
        (
            "PUT",
            "/api/v1/properties/{object_type}/{id}",
            {"object_type": "desktop", "id": 4},
            ("property.update", "desktop", "4"),
        ),
        ("PUT", "/api/v1/config/{key}", {"key": "ui.page_size"}, ("config.update", "config", "ui.page_size")),
    ],
)
def test_audit_actions_are_named_from_the_route(
    method: str, template: str, params: dict[str, object], expected: tuple[str, str, str]
) -> None:
    assert describe_action(method, template, params) == expected
