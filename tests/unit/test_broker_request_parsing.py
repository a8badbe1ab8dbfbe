"""What the broker accepts from a QVD client before touching the database: credentials, parameters, heads."""

from __future__ import annotations

import base64

import h11
import pytest

from deckard.broker.auth import Basic, Bearer, parse_authorization
from deckard.broker.http import ensure_host, looks_like_http
from deckard.broker.params import parse_connect_params, parse_desktop_id
from deckard.model.errors import BadInput, PermissionDenied, Unauthenticated


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def test_basic_credentials_keep_the_tenant_and_colons_in_the_password() -> None:
    assert parse_authorization(f"Basic {b64('alice@acme:pa:ss')}") == Basic("alice@acme", "pa:ss")
    assert parse_authorization(f"basic  {b64('bob:')}".encode()) == Basic("bob", "")


def test_bearer_token_is_base64_decoded_as_qvd_sends_it() -> None:
    assert parse_authorization(f"Bearer {b64('tok-123')}") == Bearer("tok-123")


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Basic",
        "Basic !!!notbase64",
        f"Basic {b64('no-colon')}",
        f"Basic {b64(':pw')}",
        f"Digest {b64('a:b')}",
        "Bearer ",
    ],
)
def test_missing_or_malformed_credentials_are_unauthenticated(header: str | None) -> None:
    with pytest.raises(Unauthenticated):
        parse_authorization(header)


def test_passwords_never_appear_in_a_repr() -> None:
    assert "secret" not in repr(Basic("alice", "secret"))
    assert "secret" not in repr(Bearer("secret"))


def test_connect_params_keep_client_settings_and_the_geometry() -> None:
    pairs = [
        ("qvd.client.os", "linux"),
        ("id", "7"),
        ("qvd.client.geometry", "1024x768"),
        ("qvd.client.fullscreen", ""),
        ("custom.color", "blue"),
    ]
    params = parse_connect_params(pairs)
    assert params.desktop_id == 7
    assert params.geometry == "1024x768"
    assert params.client["qvd.client.fullscreen"] == "" and params.client["custom.color"] == "blue"
    assert parse_connect_params([("id", "7"), ("qvd.client.geometry", "")]).geometry is None


@pytest.mark.parametrize(
    ("sent", "layout"),
    [("pc105/es", "es"), ("de", "de"), ("fr(azerty)", "fr(azerty)"), ("pc105/us(intl)", "us(intl)"), ("", None)],
)
def test_the_clients_keyboard_becomes_the_sessions_xkb_layout(sent: str, layout: str | None) -> None:
    assert parse_connect_params([("id", "7"), ("qvd.client.keyboard", sent)]).keyboard == layout


@pytest.mark.parametrize(
    ("pairs", "error", "code"),
    [
        ([], BadInput, "missing_id"),
        ([("id", "")], BadInput, "missing_id"),
        ([("id", "x")], BadInput, "bad_id"),
        ([("id", "0")], BadInput, "bad_id"),
        ([("id", "1"), ("id", "2")], BadInput, "bad_id"),
        ([("id", "1"), ("qvd.vm.user.name", "root")], PermissionDenied, "forbidden_parameter"),
        ([("id", "1"), ("qvd_client.x", "1")], PermissionDenied, "forbidden_parameter"),
        ([("id", "1"), ("qvd.client.geometry", "1024x768; rm")], BadInput, "bad_geometry"),
        ([("id", "1"), ("qvd.client.keyboard", "us; setxkbmap -option")], BadInput, "bad_keyboard"),
        ([("id", "1"), ("qvd.client.keyboard", "pc105/" + "x" * 300)], BadInput, "bad_keyboard"),
        # QVD's order: a missing id (422) is reported before a forbidden parameter (403)
        ([("evil", "1")], BadInput, "missing_id"),
    ],
)
def test_bad_connect_params_are_refused_with_qvds_codes(
    pairs: list[tuple[str, str]], error: type[Exception], code: str
) -> None:
    with pytest.raises(error) as info:
        parse_connect_params(pairs)
    assert info.value.code == code  # type: ignore[attr-defined]
    assert info.value.status in (403, 422)  # type: ignore[attr-defined]


def test_stop_needs_only_an_id() -> None:
    assert parse_desktop_id([("id", "12"), ("anything", "x")]) == 12


def test_a_head_without_host_gets_one_that_h11_accepts() -> None:
    head = b"GET /qvd/list_of_vm? HTTP/1.1\r\nAuthorization: Basic eDp5\r\n\r\n"
    fixed = ensure_host(head)
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(fixed)
    event = conn.next_event()
    assert isinstance(event, h11.Request) and event.target == b"/qvd/list_of_vm?"
    with pytest.raises(h11.RemoteProtocolError):
        bare = h11.Connection(h11.SERVER)
        bare.receive_data(head)
        bare.next_event()


def test_a_head_with_host_is_left_alone() -> None:
    head = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n"
    assert ensure_host(head) == head


def test_binary_first_lines_are_not_http() -> None:
    assert looks_like_http(b"GET /qvd/ping HTTP/1.1\r\n")
    assert looks_like_http(b"GET /qv")
    assert not looks_like_http(b"\x16\x03\x01\x02\x00")
    assert not looks_like_http(b"GET /\x00 HTTP/1.1\r\n")
