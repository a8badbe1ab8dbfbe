"""The live event stream (``GET /events``, Server-Sent Events) through the real API over TLS, on SQLite and
PostgreSQL: a client authenticated with ``?token=`` sees a created event and a desktop state event, and the
tenant/ACL filter drops what an administrator may not see."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import sqlalchemy as sa
import test_api
from test_api import Farm, add_node, call

from deckard.db import schema as t
from deckard.services.context import Actor
from deckard.services.event_stream import allowed_event
from deckard.services.events import DESKTOPS

farm = test_api.farm  # the real API with TLS, shared with test_api.py


async def _next_event(lines: Any, kind: str) -> dict[str, Any]:
    event = None
    async for line in lines:
        if line.startswith("event: "):
            event = line[len("event: ") :]
        elif line.startswith("data: ") and event == kind:
            return dict(json.loads(line[len("data: ") :]))
    raise AssertionError("the stream ended")


async def test_the_stream_delivers_created_and_state_events(farm: Farm) -> None:
    api = await farm.admin_client()
    await call(api.create_user, "alice", "pw-1234")
    async with farm.http() as http, http.stream("GET", "/events", params={"token": api.token}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = r.aiter_lines()
        assert await asyncio.wait_for(lines.__anext__(), 10) == ": connected"
        desk = await call(api.create_desktop, "desk1", "alice")
        created = await asyncio.wait_for(_next_event(lines, "created"), 10)
        assert (created["object"], created["id"], created["name"]) == ("desktop", desk.id, "desk1")
        async with farm.db.begin() as conn:  # what a node writes when the guest runs
            await conn.execute(sa.update(t.desktops).where(t.desktops.c.id == desk.id).values(state="running"))
        await farm.db.bus.notify(DESKTOPS, str(desk.id))
        state = await asyncio.wait_for(_next_event(lines, "state"), 10)
        if state["state"] == "stopped":  # the creation's own notification may come first
            state = await asyncio.wait_for(_next_event(lines, "state"), 10)
        assert (state["object"], state["id"], state["state"]) == ("desktop", desk.id, "running")


async def test_a_bulk_start_becomes_state_events(farm: Farm) -> None:
    api = await farm.admin_client()
    await call(api.create_user, "alice", "pw-1234")
    ids = [(await call(api.create_desktop, f"d{i}", "alice")).id for i in range(3)]
    await add_node(farm.db)
    async with farm.http(api.token) as http, http.stream("GET", "/events") as r:  # Bearer header this time
        lines = r.aiter_lines()
        assert await asyncio.wait_for(lines.__anext__(), 10) == ": connected"
        out = await call(api.bulk, "desktops", "start", ids=ids)
        assert sorted(out.ok) == ids
        seen = set()
        while seen != set(ids):
            ev = await asyncio.wait_for(_next_event(lines, "state"), 10)
            if ev["cmd"] == "start":
                seen.add(ev["id"])


async def test_the_stream_needs_a_token(farm: Farm) -> None:
    async with farm.http() as http:
        r = await http.get("/events")
    assert r.status_code == 401 and r.json()["error"]["code"]


def test_events_of_other_tenants_and_unseen_objects_are_dropped() -> None:
    tenant_admin = Actor("admin", 1, 2, "t", frozenset({"desktop.see"}))
    mine = {"type": "created", "object": "desktop", "id": 1, "tenant_id": 2, "description": "secret"}
    assert allowed_event(tenant_admin, mine) == {k: v for k, v in mine.items() if k != "description"}
    assert allowed_event(tenant_admin, {**mine, "tenant_id": 3}) is None
    assert allowed_event(tenant_admin, {**mine, "object": "user"}) is None
    root = Actor("admin", 1, None, "root")
    assert allowed_event(root, {**mine, "tenant_id": 3}) == {**mine, "tenant_id": 3}
