"""The admin API's front door under abuse (issue 8): bodies capped before they are read, connections and request
heads bounded, ids and numbers validated strictly, security headers and a CSP the pages pass in a browser.

The server is the real one (uvicorn with TLS on 127.0.0.1, in this process, so its RSS is ours to measure).
Tests about the front itself (limits, timeouts, headers) do not depend on the database and run on SQLite only;
tests that reach the services run on SQLite and PostgreSQL (the ``db`` fixture).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from deckard.api.app import create_app
from deckard.api.server import ApiServer
from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.entities import utcnow
from deckard.runtime.settings import ApiSettings, Settings
from deckard.runtime.tls import client_context, ensure_tls
from deckard.services.admins import create_api_token
from deckard.services.tenancy import bootstrap_farm
from deckard.web import DIST

# the subject is the HTTP front door (bodies, heads, headers);
# the API's SQL runs on PostgreSQL in test_api.py
DATABASES = ["sqlite"]


@dataclass
class Api:
    url: str
    port: int
    ssl: ssl.SSLContext
    token: str
    db: Database
    settings: Settings
    password: str

    def http(self, *, auth: bool = True) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.token}"} if auth else {}
        return httpx.AsyncClient(base_url=self.url, verify=self.ssl, trust_env=False, headers=headers, timeout=30)

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A raw TLS connection, for what httpx will not send (lies, slow heads, huge declared lengths)."""
        return await asyncio.open_connection("127.0.0.1", self.port, ssl=self.ssl, server_hostname="127.0.0.1")


@contextlib.asynccontextmanager
async def serve(db: Database, home: Path, **api: Any) -> AsyncIterator[Api]:
    password = await bootstrap_farm(db)
    assert password is not None
    token = await create_api_token(db, "admin", "hardening")
    ca, cert, key = ensure_tls(home / "tls")
    settings = Settings(home=home, api=ApiSettings(**api))
    server = ApiServer(create_app(db, settings), "127.0.0.1", 0, cert, key)
    stop = asyncio.Event()
    task = asyncio.create_task(server.run(stop))
    await asyncio.wait_for(server.started.wait(), 10)
    try:
        yield Api(f"https://127.0.0.1:{server.port}", server.port, client_context(ca), token, db, settings, password)
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


@contextlib.asynccontextmanager
async def sqlite_api(tmp_path: Path, **api: Any) -> AsyncIterator[Api]:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'deckard.db'}")
    await db.start()
    try:
        async with serve(db, tmp_path, **api) as a:
            yield a
    finally:
        await db.close()


async def read_response(reader: asyncio.StreamReader, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), timeout)
    return status, headers, body


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# --- request bodies -------------------------------------------------------------------------------------------


async def test_a_200_mb_login_body_is_refused_413_before_a_byte_of_it_is_read(tmp_path: Path) -> None:
    """The finding: ``POST /auth/login`` with 200 MB cost +300 MB RSS.  Now the declared length alone is
    enough for a 413 in the error envelope, and the server closes the connection instead of draining it."""
    async with sqlite_api(tmp_path) as api:
        reader, writer = await api.open()
        writer.write(
            b"POST /api/v1/auth/login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (200 << 20)
        )
        await writer.drain()
        status, headers, body = await read_response(reader)  # no body sent: an answer proves it was not awaited
        assert status == 413
        assert headers["connection"] == "close"
        error = httpx.Response(413, content=body).json()["error"]
        assert error["code"] == "body_too_large" and error["details"]["max_bytes"] == 1 << 20
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed: the rest of the body is never read
        writer.close()


async def test_a_chunked_body_is_counted_and_cut_off_past_the_limit_and_rss_stays_bounded(tmp_path: Path) -> None:
    """Without a length the body is counted as it streams: past the limit the client gets 413 and the
    connection closes, so sending 200 MB stops after about the limit and the server's memory barely moves."""
    async with sqlite_api(tmp_path, max_body_bytes=256 << 10) as api:
        before = rss_bytes()
        reader, writer = await api.open()
        writer.write(
            b"POST /api/v1/auth/login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"%x\r\n%s\r\n" % (64 << 10, b"x" * (64 << 10))
        sent = 0
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            while sent < 200 << 20 and not reader.at_eof():
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), 5)
                sent += 64 << 10
        status, _headers, body = await read_response(reader)
        assert status == 413 and b"body_too_large" in body
        assert sent < 32 << 20, f"the server kept reading: {sent} bytes went in"
        assert rss_bytes() - before < 50 << 20
        writer.close()


def send_all_then_read(port: int, context: ssl.SSLContext, length: int) -> tuple[bytes, OSError | None]:
    """A blocking client that declares ``length``, sends all of it after the server has answered, and only then
    reads: (what it read, the error its sending met)."""
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as s,
    ):
        s.sendall(b"POST /api/v1/users HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % length)
        time.sleep(0.3)  # the 413 is in this socket, unread
        sent_error = None
        try:
            s.sendall(b"0" * length)
        except OSError as e:
            sent_error = e
        out = b""
        with contextlib.suppress(OSError):
            while chunk := s.recv(65536):
                out += chunk
        return out, sent_error


async def test_a_refused_body_is_read_and_dropped_so_that_the_client_gets_the_413(tmp_path: Path) -> None:
    """Lingering close: the server reads the rest of a refused body before it closes; a socket closed with unread
    bytes resets the connection, and a client still sending (httpx sends all before it reads) may lose the 413."""
    async with sqlite_api(tmp_path) as api:
        out, sent_error = await asyncio.to_thread(send_all_then_read, api.port, api.ssl, 2 << 20)
        assert sent_error is None
        assert out.startswith(b"HTTP/1.1 413 ") and b"body_too_large" in out


async def test_json_routes_take_1_mib_and_the_upload_route_more(tmp_path: Path) -> None:
    """The limit is per route: 2 MiB to a JSON route is 413, to the image upload route it reaches the route
    (which answers for the image: 404 here, there being none)."""
    async with sqlite_api(tmp_path) as api, api.http() as http:
        two_mib = b"0" * (2 << 20)
        r = await http.post("/api/v1/users", content=two_mib, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        r = await http.put("/api/v1/images/4242/content", content=two_mib)
        assert r.status_code == 404 and r.json()["error"]["code"] == "image_not_found"
        # and a body under the limit is served as before
        r = await http.post("/api/v1/users", json={"login": "under", "password": "secret1"})
        assert r.status_code == 201


# --- connections and request heads ----------------------------------------------------------------------------


async def test_a_connection_that_does_not_finish_its_request_head_is_closed(tmp_path: Path) -> None:
    """Slowloris: half a request head, then silence.  uvicorn alone waits for ever; ours closes it."""
    async with sqlite_api(tmp_path, header_timeout_s=0.5) as api:
        reader, writer = await api.open()
        writer.write(b"GET /api/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        await writer.drain()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        # a connection that sends its request in time is served
        async with api.http(auth=False) as http:
            assert (await http.get("/api/v1/health")).status_code == 200


async def test_one_address_cannot_hold_more_than_its_connections(tmp_path: Path) -> None:
    async with sqlite_api(tmp_path, max_connections_per_address=3, header_timeout_s=30) as api:
        held = [await api.open() for _ in range(3)]
        reader, writer = await api.open()
        writer.write(b"GET /api/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed without an answer
        writer.close()
        held.pop()[1].close()
        await asyncio.sleep(0.2)
        reader, writer = await api.open()
        writer.write(b"GET /api/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert (await read_response(reader))[0] == 200  # a freed slot is usable again
        for _, w in [*held, (reader, writer)]:
            w.close()


@pytest.mark.parametrize("trickle", [False, True])
async def test_a_request_head_over_the_limit_is_refused(tmp_path: Path, trickle: bool) -> None:
    """Whole (431 from the app's front) or trickled in pieces (400 from the HTTP parser, never buffered whole)."""
    async with sqlite_api(tmp_path, max_header_bytes=4096) as api:
        reader, writer = await api.open()
        head = b"GET /api/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 8192 + b"\r\n\r\n"
        for piece in [head[i : i + 1024] for i in range(0, len(head), 1024)] if trickle else [head]:
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.02 if trickle else 0)
        status, _headers, body = await read_response(reader)
        assert status == (400 if trickle else 431)
        if not trickle:
            assert httpx.Response(status, content=body).json()["error"]["code"] == "headers_too_large"
        writer.close()


async def test_beyond_max_connections_requests_get_503(tmp_path: Path) -> None:
    async with sqlite_api(tmp_path, max_connections=2) as api:
        idle = await api.open()
        reader, writer = await api.open()
        writer.write(b"GET /api/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert (await read_response(reader))[0] == 503
        for w in (idle[1], writer):
            w.close()


# --- strict validation ------------------------------------------------------------------------------------------

BAD_IDS = ["99999999999999999999999", "2147483648", "%EF%BC%91", "%C2%B2"]  # 2**31 (ids are INTEGER), full-width 1, ²


ID_PATHS = [
    ("/api/v1/users/{}", "user"),
    ("/api/v1/desktops/{}", "desktop"),
    ("/api/v1/osfs/{}", "osf"),
    ("/api/v1/images/{}", "image_id"),
    ("/api/v1/desktops?id={}", "id"),
    ("/api/v1/users?id__in=1,{}", "id"),
    ("/api/v1/desktops?user={}", "user"),
    ("/api/v1/config?tenant={}", "tenant"),
]


async def test_ids_are_ascii_digits_within_int64_or_422_naming_the_field(db: Database, tmp_path: Path) -> None:
    """Before: a 500 (``OverflowError … SQLite INTEGER``) that dropped keep-alive, and a full-width 1 taken as id 1.
    Every bad id on every path, on one connection: each must leave it usable for the next."""
    async with serve(db, tmp_path) as api, api.http() as http:
        for path, field in ID_PATHS:
            for bad in BAD_IDS:
                r = await http.get(path.format(bad))
                where = f"{path.format(bad)}: {r.status_code} {r.text}"
                assert r.status_code == 422, where
                error = r.json()["error"]
                assert error["code"] in ("bad_input", "bad_filter"), where
                assert field in error["message"], where
                assert (await http.get("/api/v1/health")).status_code == 200, f"{where}: the connection broke"


async def test_the_largest_id_is_just_not_found_on_both_databases(db: Database, tmp_path: Path) -> None:
    async with serve(db, tmp_path) as api, api.http() as http:
        r = await http.get(f"/api/v1/users/{2**31 - 1}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "user_not_found"
        r = await http.get(f"/api/v1/desktops?id__in=1,{2**31 - 1}")
        assert r.status_code == 200 and r.json()["total"] == 0
        r = await http.get(f"/api/v1/connections?bytes_in__gt={2**62}")  # a BIGINT column takes 64 bits
        assert r.status_code == 200 and r.json()["total"] == 0


UNKNOWN_FIELDS = [
    ("POST", "/api/v1/users", {"login": "eve", "password": "secret1", "admin": True}, "admin"),
    ("PATCH", "/api/v1/users/1", {"blocked": True, "role": "root"}, "role"),
    ("POST", "/api/v1/desktops", {"name": "d", "user": "1", "node": "n1"}, "node"),
    ("POST", "/api/v1/tenants", {"name": "t", "quota": 5}, "quota"),
    ("POST", "/api/v1/desktops/bulk/stop", {"ids": [1], "everything": True}, "everything"),
    ("PUT", "/api/v1/config/ui.page_size", {"value": 20, "scope": "all"}, "scope"),
    ("POST", "/portal/login", {"login": "a", "password": "b", "remember": True}, "remember"),
]
OUT_OF_RANGE = [
    ("/api/v1/desktops/bulk/stop", {"ids": [10**30]}, "body.ids.0"),
    ("/api/v1/desktops", {"name": "d", "user": "99999999999999999999999"}, "body.user"),
    ("/api/v1/osfs", {"name": "o", "memory_mib": 10**30}, "body.memory_mib"),
]


async def test_unknown_fields_and_out_of_range_numbers_in_a_body_are_422_naming_the_field(
    db: Database, tmp_path: Path
) -> None:
    async with serve(db, tmp_path) as api, api.http() as http:
        for method, path, body, field in UNKNOWN_FIELDS:
            r = await http.request(method, path, json=body)
            assert r.status_code == 422, f"{method} {path}: {r.text}"
            error = r.json()["error"]
            assert error["code"] == "bad_input" and f"body.{field}" in error["message"], f"{method} {path}: {r.text}"
        for path, body, name in OUT_OF_RANGE:
            r = await http.post(path, json=body)
            assert r.status_code == 422 and name in r.json()["error"]["message"], f"{path}: {r.text}"


async def test_a_bad_filter_value_names_the_filter_not_a_bind_parameter(db: Database, tmp_path: Path) -> None:
    """The finding: ``?node__null=maybe`` answered "… for param_1" (SQLAlchemy's name for a bound literal)."""
    async with serve(db, tmp_path) as api, api.http() as http:
        for query, field in (("node__null=maybe", "node__null"), ("t_total_ms__gt=nan", "t_total_ms")):
            path = "/api/v1/desktops" if "node" in query else "/api/v1/connections"
            r = await http.get(f"{path}?{query}")
            assert r.status_code == 422, r.text
            message = r.json()["error"]["message"]
            assert field in message and not re.search(r"param_\d|%\(|:\w+_\d", message), message


async def test_numeric_config_keys_are_bounded_and_the_error_names_the_range(db: Database, tmp_path: Path) -> None:
    async with serve(db, tmp_path) as api, api.http() as http:
        for value in (1001, 0, "\uff11\uff10", 1e300, "50.5"):
            r = await http.put("/api/v1/config/ui.page_size", json={"value": value})
            assert r.status_code == 422, f"{value!r}: {r.text}"
            error = r.json()["error"]
            assert error["code"] == "bad_config_value", f"{value!r}: {r.text}"
            assert "ui.page_size" in error["message"] and "between 1 and 1000" in error["message"], error
        assert (await http.put("/api/v1/config/ui.page_size", json={"value": 1000})).status_code == 200


# --- security headers, CSP, Swagger UI --------------------------------------------------------------------------

FIXED_HEADERS = {
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
}
PAGES = ["/", "/admin", "/admin/spy", "/api/v1/docs"]


async def test_every_response_carries_the_security_headers(tmp_path: Path) -> None:
    async with sqlite_api(tmp_path, max_body_bytes=1024) as api, api.http(auth=False) as http:
        responses = [
            await http.get("/api/v1/health"),
            await http.get("/api/v1/users"),  # 401
            await http.get("/api/v1/nowhere"),  # 404
            await http.post("/api/v1/auth/login", content=b"{" * 4096),  # 413, from outside the app
            *[await http.get(p) for p in PAGES],
        ]
    for r in responses:
        for name, value in FIXED_HEADERS.items():
            assert r.headers.get(name) == value, (r.url, name)
        assert r.headers["strict-transport-security"].startswith("max-age=")
        csp = r.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp, r.url
        if r.headers.get("content-type", "").startswith("text/html"):
            assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
            assert "img-src 'self' data: blob:" in csp
        else:
            assert "default-src 'none'" in csp


async def test_the_page_csp_lets_the_browser_reach_the_farms_brokers(tmp_path: Path) -> None:
    """The portal and the spy page open ``broker_ws_url`` from a ticket: its origin must be in connect-src —
    the request's host for an all-in-one farm, each node's registered broker otherwise."""
    async with sqlite_api(tmp_path) as api:
        async with api.db.begin() as conn:
            for name, url in (("n1", "https://0.0.0.0:8443"), ("n2", "https://node2.example:9444")):
                await conn.execute(
                    sa.insert(t.nodes).values(
                        name=name, state="running", heartbeat_at=utcnow(), broker_url=url, created_at=utcnow()
                    )
                )
        async with api.http(auth=False) as http:
            csp = (await http.get("/")).headers["content-security-policy"]
            connect = next(d for d in csp.split("; ") if d.startswith("connect-src"))
            assert connect.split()[1:] == ["'self'", "wss://127.0.0.1:8443", "wss://node2.example:9444"]
            # a Host header cannot write into the policy
            r = await http.get("/", headers={"Host": "evil; script-src *"})
            assert "script-src *" not in r.headers["content-security-policy"]


async def test_pages_are_csp_clean_and_swagger_ui_is_served_locally(tmp_path: Path) -> None:
    """No inline script, style attribute or event handler in the HTML the server sends, and the API reference
    loads Swagger UI from this server (bundled from npm swagger-ui-dist), not from a CDN."""
    async with sqlite_api(tmp_path) as api, api.http(auth=False) as http:
        for page in PAGES:
            html = (await http.get(page)).text
            assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), page
            assert not re.search(r"\s(style|on[a-z]+)=", html), page
        docs = (await http.get("/api/v1/docs")).text
        assert "cdn" not in docs.lower() and not re.search(r"(src|href)=\"(https?:)?//", docs)
        if not (DIST / "docs.js").exists():
            pytest.skip("web assets not built (make deps)")
        for asset in ("/static/dist/docs.js", "/static/dist/docs.css"):
            r = await http.get(asset)
            assert r.status_code == 200 and len(r.content) > 10_000, asset
        assert "SwaggerUI" in (await http.get("/static/dist/docs.js")).text


async def test_admin_portal_and_api_docs_load_in_chromium_without_csp_violations(tmp_path: Path) -> None:
    """The pages under the real policy in headless Chromium: no CSP violation is reported, and each page
    rendered what it exists for (the login forms, Swagger UI's operations)."""
    from deckard.testing import CHROMIUM, CHROMIUM_ARGS, agoto, browser_unavailable_reason

    reason = browser_unavailable_reason()
    if reason:
        pytest.skip(reason)
    if not (DIST / "docs.js").exists():
        pytest.skip("web assets not built (make deps)")
    from playwright.async_api import async_playwright

    async with sqlite_api(tmp_path) as api, async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            context = await browser.new_context(ignore_https_errors=True)
            page = await context.new_page()
            messages: list[str] = []
            page.on("console", lambda m: messages.append(m.text))
            for path, ready in (("/", "#login-form"), ("/admin", "form"), ("/api/v1/docs", ".opblock")):
                await agoto(page, api.url + path)
                await page.wait_for_selector(ready, timeout=20_000)
            # logged in, the WAT draws its dashboard (uPlot charts) and a list
            await agoto(page, api.url + "/admin")
            await page.get_by_label("Name").fill("admin")
            await page.get_by_label("Password").fill(api.password)
            await page.get_by_role("button", name="Log in").click()
            await page.wait_for_function("() => document.body.dataset.dashboard === 'drawn'", timeout=20_000)
            await agoto(page, api.url + "/admin#/users")
            await page.wait_for_selector("table.list", timeout=20_000)
            violations = [m for m in messages if "Content Security Policy" in m or "Refused to" in m]
            assert violations == []
        finally:
            await browser.close()
