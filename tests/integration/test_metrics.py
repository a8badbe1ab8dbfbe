"""``GET /metrics`` exposes the farm's Prometheus series after a real connect, to the administrators only.

What is real: the API app (over ``httpx.ASGITransport``), the broker on 127.0.0.1 with the farm's TLS, the
database, the node daemon (``deckard.testing.InProcessNode``).  Faked, as the layer below: the guests (the fake
driver).  Counters are per process and other tests run in it too, so the test compares scrapes before and after.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from deckard.api.app import create_app
from deckard.broker.server import Broker
from deckard.client import broker as broker_client
from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.runtime.settings import ApiSettings, BrokerSettings, Settings
from deckard.runtime.tls import ensure_tls, server_context
from deckard.services.admins import create_admin
from deckard.services.context import SYSTEM
from deckard.services.desktops import create_desktop
from deckard.services.images import register_image
from deckard.services.roles import create_role
from deckard.services.tenancy import bootstrap_farm
from deckard.services.users import create_user
from deckard.testing import InProcessNode

RFB_BANNER = b"RFB 003.008\n"
SCRAPER_SECRET = "scrape-" + "x" * 24

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass
class Farm:
    db: Database
    broker: Broker
    node: InProcessNode
    ca: Path
    desktop_id: int
    image_id: int
    admin_password: str
    http: httpx.AsyncClient

    async def scrape(self, token: str = SCRAPER_SECRET) -> Samples:
        res = await self.http.get("/metrics", headers={"Authorization": f"Bearer {token}"})
        assert res.status_code == 200, res.text
        assert res.headers["content-type"].startswith("text/plain")
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(res.text)
            for s in family.samples
        }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
async def farm(db: Database, tmp_path: Path) -> AsyncIterator[Farm]:
    password = await bootstrap_farm(db)
    assert password
    await create_user(db, SYSTEM, "alice", "pw-alice")
    network = f"127.{random.randint(100, 250)}.{random.randint(0, 255)}.0/24"
    desk = await create_desktop(db, SYSTEM, "alice-desk", "alice", network=network)
    node = InProcessNode.fake(db, network)
    image_file = node.settings.home / "image.tar"
    image_file.write_bytes(b"")
    image = await register_image(db, image_file, version="test")
    ca, cert, key = ensure_tls(node.settings.home / "tls")
    broker = Broker(db, BrokerSettings(start_timeout=10, display_timeout=5), server_context(cert, key), poll=0.1)
    app = create_app(db, Settings(home=tmp_path, api=ApiSettings(metrics_token=SCRAPER_SECRET)))
    transport = httpx.ASGITransport(app=app)
    try:
        await node.start()
        await broker.start("127.0.0.1", 0)
        async with httpx.AsyncClient(transport=transport, base_url="https://api.test") as http:
            yield Farm(db, broker, node, ca, int(desk["id"]), int(image["id"]), password, http)
    finally:
        await broker.close()
        await node.close()


async def connections_recorded(db: Database, desktop_id: int) -> list[Any]:
    async with db.connect() as conn:
        q = sa.select(t.connections).where(
            t.connections.c.desktop_id == desktop_id, t.connections.c.ended_at.is_not(None)
        )
        return list(await conn.execute(q))


async def test_metrics_show_a_connects_phases_tunnel_bytes_node_and_api_series(farm: Farm) -> None:
    """After one cold connect through the broker, each named series is there and moved by what happened."""
    before = await farm.scrape()
    reader, writer = await broker_client.connect(
        f"127.0.0.1:{farm.broker.port}", "alice", "pw-alice", farm.ca, farm.desktop_id
    )
    assert await asyncio.wait_for(reader.readexactly(len(RFB_BANNER)), 5) == RFB_BANNER
    during = await farm.scrape()
    assert value(during, "deckard_broker_tunnels") == value(before, "deckard_broker_tunnels") + 1
    writer.close()
    for _ in range(600):  # up to 30 s on a loaded machine: the bytes are counted just before the close is recorded
        if await connections_recorded(farm.db, farm.desktop_id):
            break
        await asyncio.sleep(0.05)
    after = await farm.scrape()

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("deckard_broker_connects_total", result="connected") == 1
    assert value(after, "deckard_broker_tunnels") == value(before, "deckard_broker_tunnels")
    assert delta("deckard_broker_relayed_bytes_total", direction="out") >= len(RFB_BANNER)
    node = farm.node.settings.node.name
    where = {"image": str(farm.image_id), "node": node}
    for phase in ("auth", "claim", "start", "agent", "display", "total"):
        assert delta("deckard_time_to_desktop_seconds_count", phase=phase, **where) == 1, phase
    total = delta("deckard_time_to_desktop_seconds_sum", phase="total", **where)
    assert 0 < total < 10
    assert total >= delta("deckard_time_to_desktop_seconds_sum", phase="start", **where)
    assert delta("deckard_time_to_desktop_seconds_bucket", phase="total", le="+Inf", **where) == 1
    assert delta("deckard_placement_decisions_total", result="placed") == 1
    assert delta("deckard_node_desktop_starts_total", node=node, result="ok") == 1
    assert delta("deckard_node_desktop_start_seconds_count", node=node) == 1
    assert value(after, "deckard_node_heartbeat_seconds_count", node=node) >= 1
    # the API counts itself by route template: the two scrapes before this one
    assert delta("deckard_api_requests_total", route="/metrics", method="GET", status="200") == 2
    # bounded cardinality: no series of ours is labelled by user, desktop, peer or raw path
    keys = {k for name, labels in after if name.startswith("deckard_") for k, _v in labels}
    assert keys <= {"result", "phase", "image", "node", "direction", "route", "method", "status", "code", "le"}, keys
    assert not any("alice" in v or "alice-desk" in v for _name, labels in after for _k, v in labels)


async def test_metrics_are_for_the_farms_administrators_and_the_scraper_secret(farm: Farm) -> None:
    """No token or a wrong one: 401; an administrator without stats.see: 403; the farm's admin or the secret: 200."""
    assert (await farm.http.get("/metrics")).status_code == 401
    res = await farm.http.get("/metrics", headers={"Authorization": "Bearer scrape-wrong"})
    assert res.status_code == 401 and res.json()["error"]["code"] == "bad_token"
    await create_role(farm.db, SYSTEM, "Desktops only", grants=[("desktop.see", True)])
    await create_admin(farm.db, SYSTEM, "deskview", "pw-deskview-1234", roles=["Desktops only"])
    for name, password, status in (("deskview", "pw-deskview-1234", 403), ("admin", farm.admin_password, 200)):
        login = await farm.http.post("/api/v1/auth/login", json={"name": name, "password": password})
        token = login.json()["token"]
        res = await farm.http.get("/metrics", headers={"Authorization": f"Bearer {token}"})
        assert res.status_code == status, res.text
    before = await farm.scrape()
    res = await farm.http.get(f"/api/v1/desktops/{farm.desktop_id}", headers={"Authorization": f"Bearer {token}"})
    assert res.status_code == 200, res.text
    samples = await farm.scrape()
    template = {"route": "/api/v1/desktops/{desktop}", "method": "GET", "status": "200"}
    assert (
        value(samples, "deckard_api_requests_total", **template)
        == value(before, "deckard_api_requests_total", **template) + 1
    )
    assert not any(v.endswith(f"/{farm.desktop_id}") for _name, labels in samples for k, v in labels if k == "route")
    assert value(samples, "deckard_api_errors_total", code="forbidden_action") >= 1
    assert value(samples, "deckard_api_errors_total", code="unauthenticated") >= 1
    assert value(samples, "deckard_api_errors_total", code="bad_token") >= 1
    assert value(samples, "deckard_api_requests_total", route="/metrics", method="GET", status="403") >= 1
