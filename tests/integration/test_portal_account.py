"""The portal user's own account over HTTP (``api/routes/portal_account.py``), the app in-process through httpx's
ASGI transport, on SQLite: second factor enrolment (logged in, and inside a login the tenant
requires it for), personal tokens, and the bodies the routes refuse.

Codes come from pyotp, as an authenticator app makes them.  A code confirms an enrolment once and cannot log in
right after (its 30-second step is used), so enrolments confirm with the previous step's code (still in the
window) and logins use the current one.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import httpx
import pyotp
import pytest
import sqlalchemy as sa

from deckard.api.app import create_app
from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.runtime.settings import Settings
from deckard.services import config, identity, users
from deckard.services.context import SYSTEM
from deckard.services.tenancy import bootstrap_farm

# HTTP, flows and rules, not SQL: SQLite only (the queries underneath run on PostgreSQL in test_identity.py,
# test_second_factor.py and test_admin_identity.py), to keep make test under its time budget
DATABASES = ["sqlite"]  # read by tests/conftest.py


@pytest.fixture
async def http(db: Database, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    await bootstrap_farm(db)
    for login in ("alice", "bob"):
        await users.create_user(db, SYSTEM, login, f"pw-{login}")
    await config.set_config(db, SYSTEM, "auth.failure_floor_ms", 0)  # wrong codes need not wait in these tests
    app = create_app(db, Settings(home=tmp_path))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="https://portal.test") as client:
        yield client


async def _log_in(http: httpx.AsyncClient, login: str = "alice") -> dict[str, str]:
    res = await http.post("/portal/login", json={"login": login, "password": f"pw-{login}"})
    assert res.status_code == 200, res.text
    return {"Authorization": f"Bearer {res.json()['token']}"}


def _error(res: httpx.Response, status: int) -> dict[str, Any]:
    assert res.status_code == status, res.text
    error: dict[str, Any] = res.json()["error"]
    return error


def _wrong(totp: pyotp.TOTP) -> str:
    """A six-digit code valid at no step of the window (previous, current, next)."""
    now = time.time()
    valid = {totp.at(now + d) for d in (-30, 0, 30)}
    return next(c for c in ("000000", "111111", "222222", "333333") if c not in valid)


async def test_a_user_enrols_an_app_and_their_next_login_asks_for_its_code_in_a_second_step(
    http: httpx.AsyncClient,
) -> None:
    auth = await _log_in(http)
    mine = await http.get("/portal/me/second-factor", headers=auth)
    assert mine.json() == {"enrolled": False, "pending": False, "recovery_codes_left": 0}
    enrol = (await http.post("/portal/me/second-factor/enrol", headers=auth)).json()
    uri = urlsplit(enrol["uri"])
    assert (uri.scheme, uri.netloc) == ("otpauth", "totp")
    assert unquote(uri.path).endswith("alice@default") and parse_qs(uri.query)["secret"] == [enrol["secret"]]
    assert parse_qs(uri.query)["issuer"] == ["Deckard"]
    assert (await http.get("/portal/me/second-factor", headers=auth)).json()["pending"] is True
    totp = pyotp.TOTP(enrol["secret"])

    res = await http.post("/portal/me/second-factor/confirm", headers=auth, json={"code": _wrong(totp)})
    assert _error(res, 401)["code"] == "bad_second_factor"
    res = await http.post("/portal/me/second-factor/confirm", headers=auth, json={"code": totp.at(time.time() - 30)})
    assert res.status_code == 200, res.text
    codes = res.json()["recovery_codes"]
    assert len(codes) == 10 == len(set(codes))
    assert (await http.get("/portal/me/second-factor", headers=auth)).json() == {
        "enrolled": True,
        "pending": False,
        "recovery_codes_left": 10,
    }
    res = await http.post("/portal/me/second-factor/enrol", headers=auth)
    assert _error(res, 409)["code"] == "second_factor_enrolled", "an enrolled factor is not replaced from a session"

    res = await http.post("/portal/login", json={"login": "alice", "password": "pw-alice"})
    error = _error(res, 401)
    assert error["code"] == "totp_required" and error["details"]["expires_at"]
    challenge = error["details"]["challenge"]
    res = await http.post("/portal/login/second-factor", json={"challenge": challenge, "code": totp.now()})
    assert res.status_code == 200, res.text
    session = {"Authorization": f"Bearer {res.json()['token']}"}
    assert res.json()["login"] == "alice"
    assert (await http.get("/portal/desktops", headers=session)).status_code == 200

    fresh = (await http.post("/portal/me/second-factor/recovery-codes", headers=session)).json()["recovery_codes"]
    assert len(fresh) == 10 and not set(fresh) & set(codes)
    error = _error(await http.post("/portal/login", json={"login": "alice", "password": "pw-alice"}), 401)
    step = {"challenge": error["details"]["challenge"]}
    res = await http.post("/portal/login/second-factor", json={**step, "code": codes[0]})
    assert _error(res, 401)["code"] == "bad_second_factor", "the old recovery codes are gone"
    assert (await http.post("/portal/login/second-factor", json={**step, "code": fresh[0]})).status_code == 200
    left = (await http.get("/portal/me/second-factor", headers=session)).json()["recovery_codes_left"]
    assert left == 9


async def test_a_tenant_that_requires_a_second_factor_enrols_the_user_inside_the_login(
    http: httpx.AsyncClient, db: Database
) -> None:
    await config.set_config(db, SYSTEM, "auth.totp.required", True)
    error = _error(await http.post("/portal/login", json={"login": "alice", "password": "pw-alice"}), 401)
    assert error["code"] == "totp_enrolment_required"
    challenge = error["details"]["challenge"]
    enrol = await http.post("/portal/login/enrol", json={"challenge": challenge})
    assert enrol.status_code == 200, enrol.text
    totp = pyotp.TOTP(enrol.json()["secret"])
    assert enrol.json()["uri"].startswith("otpauth://totp/")

    res = await http.post("/portal/login/enrol/confirm", json={"challenge": challenge, "code": _wrong(totp)})
    assert _error(res, 401)["code"] == "bad_second_factor"
    res = await http.post("/portal/login/enrol/confirm", json={"challenge": challenge, "code": totp.now()})
    assert res.status_code == 200, res.text
    body = res.json()
    assert set(body) == {"token", "login", "expires_at", "recovery_codes"}
    assert body["login"] == "alice" and len(set(body["recovery_codes"])) == 10
    session = {"Authorization": f"Bearer {body['token']}"}
    assert (await http.get("/portal/me/second-factor", headers=session)).json()["enrolled"] is True

    res = await http.post("/portal/login/enrol", json={"challenge": challenge})
    assert _error(res, 401)["code"] == "challenge_expired", "the login used the challenge up"
    # an enrolled user's challenge (password known, code not) cannot be turned into a new enrolment
    error = _error(await http.post("/portal/login", json={"login": "alice", "password": "pw-alice"}), 401)
    assert error["code"] == "totp_required"
    res = await http.post("/portal/login/enrol", json={"challenge": error["details"]["challenge"]})
    assert _error(res, 409)["code"] == "second_factor_enrolled"
    res = await http.post("/portal/login/enrol", json={"challenge": "forged"})
    assert _error(res, 401)["code"] == "challenge_expired"


async def test_a_user_makes_lists_and_revokes_their_own_tokens_and_no_one_else_s(
    http: httpx.AsyncClient, db: Database
) -> None:
    alice, bob = await _log_in(http, "alice"), await _log_in(http, "bob")
    res = await http.post("/portal/me/tokens", headers=alice, json={"name": "laptop", "days": 7})
    assert res.status_code == 201, res.text
    made = res.json()
    assert set(made) == {"token", "id", "name", "created_at", "expires_at"} and made["token"].startswith("dku_")
    assert (await identity.login_token(db, made["token"])).user.login == "alice", "the token logs in (QVD --token)"

    listed = (await http.get("/portal/me/tokens", headers=alice)).json()
    assert [(r["id"], r["name"], r["revoked"]) for r in listed] == [(made["id"], "laptop", False)]
    assert listed[0]["last_used_at"] is not None and "token" not in listed[0], "the secret is shown only once"
    assert listed[0]["expires_at"].endswith(("Z", "+00:00")), "times carry their zone, on SQLite too"
    assert (await http.get("/portal/me/tokens", headers=bob)).json() == []

    res = await http.delete(f"/portal/me/tokens/{made['id']}", headers=bob)
    assert _error(res, 404)["code"] == "token_not_found", "another user's token is not found"
    res = await http.delete(f"/portal/me/tokens/{made['id']}", headers=alice)
    assert res.status_code == 204 and not res.content
    assert (await http.get("/portal/me/tokens", headers=alice)).json()[0]["revoked"] is True
    assert _error(await http.delete("/portal/me/tokens/999999", headers=alice), 404)["code"] == "token_not_found"

    res = await http.post("/portal/me/tokens", headers=alice, json={"name": "ci"})
    assert _error(await http.post("/portal/me/tokens", headers=alice, json={"name": "ci"}), 409)["code"] == "duplicate"
    res = await http.post("/portal/me/tokens", headers=alice, json={"name": "../etc"})
    assert _error(res, 422)["code"] == "bad_token_name"
    res = await http.post("/portal/me/tokens", headers=alice, json={"name": "long", "days": 91})
    error = _error(res, 422)
    assert error["code"] == "bad_token_lifetime" and error["details"]["maximum"] == 90
    assert _error(await http.get("/portal/me/tokens"), 401)["code"] == "no_credentials"

    async with db.connect() as conn:
        q = sa.select(t.audit_log.c.action, t.audit_log.c.admin_name).where(t.audit_log.c.action.like("user.token.%"))
        audited = [tuple(r) for r in (await conn.execute(q.order_by(t.audit_log.c.id))).all()]
    assert audited == [
        ("user.token.create", "user:alice"),
        ("user.token.revoke", "user:alice"),
        ("user.token.create", "user:alice"),  # "ci"; the refused ones are not changes
    ]


BAD_REQUESTS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/portal/login/enrol", {}),
    ("POST", "/portal/login/enrol", {"challenge": "x" * 129}),
    ("POST", "/portal/login/enrol", {"challenge": "c", "extra": 1}),
    ("POST", "/portal/login/enrol/confirm", {"challenge": "c"}),
    ("POST", "/portal/login/enrol/confirm", {"challenge": "c", "code": "1" * 33}),
    ("POST", "/portal/me/second-factor/confirm", {"code": ""}),
    ("POST", "/portal/me/second-factor/confirm", {"code": "123456", "secret": "x"}),
    ("POST", "/portal/me/tokens", {"name": ""}),
    ("POST", "/portal/me/tokens", {"name": "n" * 65}),
    ("POST", "/portal/me/tokens", {"name": "laptop", "days": 0}),
    ("POST", "/portal/me/tokens", {"name": "laptop", "days": 3651}),
    ("POST", "/portal/me/tokens", {"name": "laptop", "days": "many"}),
    ("DELETE", "/portal/me/tokens/0", None),
    ("DELETE", "/portal/me/tokens/99999999999999999999999", None),
]


async def test_bad_bodies_and_ids_are_422_bad_input_naming_the_field(http: httpx.AsyncClient) -> None:
    auth = await _log_in(http)
    for method, path, body in BAD_REQUESTS:
        res = await http.request(method, path, headers=auth, json=body)
        assert res.status_code == 422, (method, path, body, res.text)
        assert res.json()["error"]["code"] == "bad_input", (method, path, body)
