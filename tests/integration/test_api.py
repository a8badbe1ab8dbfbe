"""The admin API served for real: uvicorn with TLS on 127.0.0.1, over a real database, driven by ``ApiClient``
(in a thread, as the CLI uses it) and by raw ``httpx`` where the wire format itself is under test."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ParamSpec, TypeVar

import httpx
import pytest
import sqlalchemy as sa

from deckard.api.app import create_app
from deckard.api.server import ApiServer
from deckard.client.api import ApiClient
from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.entities import utcnow
from deckard.model.errors import BadInput, Conflict, NotFound, PermissionDenied, Unauthenticated
from deckard.runtime.settings import Settings
from deckard.runtime.tls import client_context, ensure_tls
from deckard.services.tenancy import bootstrap_farm

P = ParamSpec("P")
R = TypeVar("R")


@dataclass
class Farm:
    url: str
    ca: Path
    db: Database
    password: str
    ssl: ssl.SSLContext
    clients: list[ApiClient] = field(default_factory=list)

    def client(self, token: str | None = None) -> ApiClient:
        client = ApiClient(self.url, token, self.ca)
        self.clients.append(client)  # closed before the server stops, so shutdown need not wait for them
        return client

    def http(self, token: str | None = None) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.AsyncClient(
            base_url=self.url + "/api/v1", verify=self.ssl, trust_env=False, headers=headers, timeout=60
        )

    async def admin_client(self) -> ApiClient:
        client = self.client()
        await asyncio.to_thread(client.login, "admin", self.password)
        return client


@pytest.fixture
async def farm(db: Database, tmp_path: Path) -> AsyncIterator[Farm]:
    password = await bootstrap_farm(db)
    assert password is not None
    ca, cert, key = ensure_tls(tmp_path / "tls")
    server = ApiServer(create_app(db, Settings(home=tmp_path)), "127.0.0.1", 0, cert, key)
    stop = asyncio.Event()
    task = asyncio.create_task(server.run(stop))
    await asyncio.wait_for(server.started.wait(), 10)
    the_farm = Farm(f"https://127.0.0.1:{server.port}", ca, db, password, client_context(ca))
    try:
        yield the_farm
    finally:
        for client in the_farm.clients:
            client.close()
        stop.set()
        await asyncio.wait_for(task, 10)  # the server ends by itself once stop is set


async def call(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """ApiClient is synchronous: run it off the event loop that serves the API (typed: the client's schemas)."""
    return await asyncio.to_thread(fn, *args, **kwargs)


async def add_node(db: Database, name: str = "n1") -> int:
    async with db.begin() as conn:
        res = await conn.execute(
            sa.insert(t.nodes)
            .values(
                name=name,
                state="running",
                heartbeat_at=utcnow(),
                mem_total_mib=16000,
                mem_free_mib=16000,
                cpus=8,
                created_at=utcnow(),
            )
            .returning(t.nodes.c.id)
        )
        return int(res.scalar_one())


async def test_health_is_public_and_reports_the_database(farm: Farm) -> None:
    async with farm.http() as http:
        r = await http.get("/health")
    assert r.status_code == 200
    assert r.json()["status"] == "ok" and r.json()["database"] == "ok" and r.json()["version"]


async def test_login_gives_a_token_that_identifies_the_admin(farm: Farm) -> None:
    client = farm.client()
    out = await call(client.login, "admin", farm.password)
    assert out.token.startswith("dk_")
    assert out.expires_at > dt.datetime.now(dt.UTC)
    me = await call(client.whoami)
    assert me.name == "admin" and me.kind == "admin"


@pytest.mark.parametrize("name,password", [("admin", "wrong"), ("nobody", "wrong")])
async def test_bad_login_is_401_bad_credentials_whatever_was_wrong(farm: Farm, name: str, password: str) -> None:
    with pytest.raises(Unauthenticated) as e:
        await call(farm.client().login, name, password)
    assert e.value.code == "bad_credentials" and e.value.status == 401


async def test_requests_without_a_valid_token_are_401_in_the_error_envelope(farm: Farm) -> None:
    async with farm.http() as http:
        r = await http.get("/users")
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "unauthenticated"
    assert r.headers["www-authenticate"] == "Bearer"
    async with farm.http("dk_not-a-token") as http:
        r = await http.get("/users")
    assert r.status_code == 401 and r.json()["error"]["code"] == "bad_token"


async def test_logout_revokes_the_token(farm: Farm) -> None:
    client = await farm.admin_client()
    token = client.token
    await call(client.logout)
    with pytest.raises(Unauthenticated) as e:
        await call(farm.client(token).whoami)
    assert e.value.code == "bad_token"


async def test_an_expired_session_is_401_session_expired(farm: Farm) -> None:
    client = await farm.admin_client()
    async with farm.db.begin() as conn:
        await conn.execute(sa.update(t.admin_tokens).values(expires_at=utcnow() - dt.timedelta(seconds=1)))
    with pytest.raises(Unauthenticated) as e:
        await call(client.whoami)
    assert e.value.code == "session_expired"


async def test_user_lifecycle_create_show_change_list_delete(farm: Farm) -> None:
    api = await farm.admin_client()
    alice = await call(api.create_user, "alice", "secret1", "first user")
    assert alice.login == "alice" and alice.blocked is False
    async with farm.http(api.token) as http:
        assert "password_hash" not in (await http.get("/users/alice")).json()  # never on the wire
    assert (await call(api.get_user, "alice")).id == alice.id
    assert (await call(api.get_user, alice.id)).login == "alice"
    assert (await call(api.block_user, "alice")).blocked is True
    await call(api.set_user_password, "alice", "secret2")
    async with farm.db.connect() as conn:
        hashed = (await conn.execute(sa.select(t.users.c.password_hash))).scalar_one()
    assert hashed.startswith("$argon2")
    assert [u.login for u in await call(api.list_users)] == ["alice"]
    await call(api.delete_user, "alice")
    assert await call(api.list_users) == []
    with pytest.raises(NotFound) as e:
        await call(api.get_user, "alice")
    assert e.value.code == "user_not_found"


async def test_a_duplicate_user_is_409_and_changes_nothing(farm: Farm) -> None:
    api = await farm.admin_client()
    await call(api.create_user, "bob", "secret1")
    with pytest.raises(Conflict) as e:
        await call(api.create_user, "bob", "other-password")
    assert e.value.code == "duplicate" and e.value.status == 409
    assert len(await call(api.list_users)) == 1


async def test_an_invalid_login_is_422_with_its_code(farm: Farm) -> None:
    api = await farm.admin_client()
    with pytest.raises(BadInput) as e:
        await call(api.create_user, "Not Valid", "secret1")
    assert e.value.code == "bad_login" and e.value.status == 422


async def test_desktops_get_distinct_ips_and_can_be_listed_by_user(farm: Farm) -> None:
    api = await farm.admin_client()
    await call(api.create_user, "carol", "secret1")
    await call(api.create_user, "dave", "secret1")
    one = await call(api.create_desktop, "carol-1", "carol")
    two = await call(api.create_desktop, "dave-1", "dave", tag="head")
    assert one.ip != two.ip and one.mac != two.mac
    assert one.state == "stopped" and one.osf == "default" and two.tag == "head"
    assert [d.name for d in await call(api.list_desktops, user="carol")] == ["carol-1"]
    assert len(await call(api.list_desktops)) == 2
    assert (await call(api.get_desktop, "dave-1")).id == two.id


async def test_thirty_concurrent_creates_get_thirty_distinct_ips(farm: Farm) -> None:
    api = await farm.admin_client()
    await call(api.create_user, "erin", "secret1")
    async with farm.http(api.token) as http:
        replies = await asyncio.gather(
            *(http.post("/desktops", json={"name": f"erin-{i}", "user": "erin"}) for i in range(30))
        )
    assert [r.status_code for r in replies] == [201] * 30, [r.text for r in replies if r.status_code != 201]
    ips = {r.json()["ip"] for r in replies}
    assert len(ips) == 30
    async with farm.db.connect() as conn:
        assert (await conn.execute(sa.select(sa.func.count()).select_from(t.desktops))).scalar_one() == 30


async def test_deleting_a_running_desktop_is_refused_with_409(farm: Farm) -> None:
    api = await farm.admin_client()
    await call(api.create_user, "frank", "secret1")
    desk = await call(api.create_desktop, "frank-1", "frank")
    async with farm.db.begin() as conn:
        await conn.execute(sa.update(t.desktops).where(t.desktops.c.id == desk.id).values(state="running"))
    with pytest.raises(Conflict) as e:
        await call(api.delete_desktop, "frank-1")
    assert e.value.code == "desktop_running"
    assert (await call(api.get_desktop, desk.id)).state == "running"
    async with farm.db.begin() as conn:
        await conn.execute(sa.update(t.desktops).where(t.desktops.c.id == desk.id).values(state="stopped"))
    await call(api.delete_desktop, "frank-1")
    assert await call(api.list_desktops) == []


async def test_an_unknown_desktop_is_404_with_its_code(farm: Farm) -> None:
    api = await farm.admin_client()
    with pytest.raises(NotFound) as e:
        await call(api.get_desktop, "nope")
    assert e.value.code == "desktop_not_found"
    async with farm.http(api.token) as http:
        r = await http.post("/desktops/424242/start")
    assert r.status_code == 404 and r.json()["error"]["code"] == "desktop_not_found"


async def test_start_places_the_desktop_and_block_prevents_starting(farm: Farm) -> None:
    api = await farm.admin_client()
    node_id = await add_node(farm.db)
    await call(api.create_user, "gina", "secret1")
    await call(api.create_desktop, "gina-1", "gina")
    started = await call(api.start_desktop, "gina-1")
    assert started.cmd == "start" and started.node_id == node_id and started.node == "n1"
    stopped = await call(api.stop_desktop, "gina-1")  # not claimed yet: the start is withdrawn
    assert stopped.cmd is None and stopped.state == "stopped"
    assert (await call(api.block_desktop, "gina-1")).blocked is True
    with pytest.raises(PermissionDenied) as e:
        await call(api.start_desktop, "gina-1")
    assert (e.value.code, e.value.status) == ("desktop_blocked", 403)  # as the broker answers it
    assert (await call(api.unblock_desktop, "gina-1")).blocked is False
    nodes = await call(api.list_nodes)
    assert [(n.name, n.state) for n in nodes] == [("n1", "running")]


async def test_starting_without_any_node_is_503_no_node(farm: Farm) -> None:
    api = await farm.admin_client()
    await call(api.create_user, "hank", "secret1")
    await call(api.create_desktop, "hank-1", "hank")
    async with farm.http(api.token) as http:
        r = await http.post("/desktops/hank-1/start")
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_node"


async def test_osfs_and_images_are_listed(farm: Farm) -> None:
    api = await farm.admin_client()
    assert [o.name for o in await call(api.list_osfs)] == ["default"]
    assert await call(api.list_images) == []


async def test_malformed_json_is_422_bad_input(farm: Farm) -> None:
    api = await farm.admin_client()
    async with farm.http(api.token) as http:
        r = await http.post("/users", content=b'{"login": "x",', headers={"content-type": "application/json"})
        missing = await http.post("/users", json={"password": "secret1"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "bad_input"
    assert missing.status_code == 422 and missing.json()["error"]["code"] == "bad_input"
    assert "login" in missing.json()["error"]["message"]
    assert await call(api.list_users) == []


async def test_unknown_routes_and_methods_answer_in_the_envelope(farm: Farm) -> None:
    async with farm.http() as http:
        unknown = await http.get("/no-such-thing")
        wrong_method = await http.put("/health")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"


async def test_the_openapi_document_lists_every_route(farm: Farm) -> None:
    async with farm.http() as http:
        doc = (await http.get("/openapi.json")).json()
        docs_page = await http.get("/docs")
    assert docs_page.status_code == 200
    routes = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    expected = {
        ("/api/v1/health", "get"),
        ("/api/v1/auth/login", "post"),
        ("/api/v1/auth/logout", "post"),
        ("/api/v1/auth/whoami", "get"),
        ("/api/v1/users", "get"),
        ("/api/v1/users", "post"),
        ("/api/v1/users/{user}", "get"),
        ("/api/v1/users/{user}", "patch"),
        ("/api/v1/users/{user}", "delete"),
        ("/api/v1/desktops", "get"),
        ("/api/v1/desktops", "post"),
        ("/api/v1/desktops/{desktop}", "get"),
        ("/api/v1/desktops/{desktop}", "delete"),
        *{("/api/v1/desktops/{desktop}/" + a, "post") for a in ("start", "stop", "block", "unblock")},
        ("/api/v1/nodes", "get"),
        ("/api/v1/images", "get"),
        ("/api/v1/osfs", "get"),
    }
    assert expected <= routes  # every route of this slice is there; later work adds more
    # every route that returns a body documents its schema, so generated clients are complete
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            ok = next(s for s in op["responses"] if s.startswith("2"))
            content = op["responses"][ok].get("content", {})
            if ok != "204" and "text/event-stream" not in content:  # the event stream is not JSON
                assert "schema" in content["application/json"], (method, path)
    assert "bearer" in str(doc["components"]["securitySchemes"]).lower()
