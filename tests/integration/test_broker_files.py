"""The portal's file panel through the broker (``/ws/files``), against a real database, broker and portal tickets.

Real: the Broker with the farm's TLS, the database (SQLite and PostgreSQL), tickets and configuration.  The desktop
is the fake guest of ``test_broker_protocol.py``; the agent's file routes are replaced by an in-memory double of
``client/agent_files.AgentFiles`` (the agent's own checks and I/O are tested in ``tests/unit/test_vma_files.py``,
and the whole path with a real container and Chromium in ``tests/e2e/test_portal_files.py``).
"""

# ruff: noqa: F811  (tests take the imported ``farm`` fixture as a parameter)

from __future__ import annotations

import json
import os
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from test_broker_protocol import Farm, farm  # noqa: F401  (the fixture)
from test_broker_websocket import WsClient, connect_ticket

from deckard.broker import files as broker_files
from deckard.client.agent_files import AgentFileError
from deckard.model.errors import Conflict, PermissionDenied
from deckard.services import config, identity, portal, tickets
from deckard.services.context import SYSTEM

# the subject is the file channel;
# the connect path's SQL runs on PostgreSQL in test_broker_protocol.py
DATABASES = ["sqlite"]


class MemoryFiles:
    """The agent's file routes as the broker sees them, over a dict (a layer double)."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {"Downloads/report.txt": b"quarterly numbers\n" * 1000}
        self.aborted = 0

    def __call__(self, *_args: Any, **_kw: Any) -> MemoryFiles:
        return self

    async def list(self, directory: str) -> dict[str, Any]:
        if ".." in directory.split("/"):
            raise AgentFileError("bad_path", "no .. in paths")
        names = [p.split("/", 1)[1] for p in self.files if p.startswith(directory + "/")]
        entries = [{"name": n, "type": "file", "size": len(self.files[f"{directory}/{n}"]), "mtime": 0} for n in names]
        return {"dir": directory, "entries": entries, "truncated": False}

    async def upload(self, path: str, size: int, body: AsyncIterator[bytes], max_bytes: int) -> dict[str, Any]:
        data = b""
        try:
            async for chunk in body:
                data += chunk
        except BaseException:
            self.aborted += 1
            raise
        assert len(data) == size <= max_bytes
        while path in self.files:
            path = path.replace(".", " (1).", 1)
        self.files[path] = data
        return {"path": path, "size": size}

    @asynccontextmanager
    async def download(self, path: str) -> AsyncIterator[tuple[str, int, AsyncIterator[bytes]]]:
        if path not in self.files:
            raise AgentFileError("not_found", f"{path} does not exist")
        data = self.files[path]

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(data), 4096):
                yield data[i : i + 4096]

        yield path.rsplit("/", 1)[-1], len(data), chunks()


@pytest.fixture
def memory_files(monkeypatch: pytest.MonkeyPatch) -> MemoryFiles:
    double = MemoryFiles()
    monkeypatch.setattr(broker_files, "AgentFiles", double)
    return double


async def _running(farm: Farm) -> None:
    """Start alice's desktop the way the portal does (a connect), and leave it running."""
    ticket = await connect_ticket(farm)
    ws, status, _ = await WsClient.open(farm, f"/ws/connect?id={farm.alice_desk['id']}&ticket={ticket}")
    assert status == 101
    while (await ws.frame())[0] != 2:
        pass
    await ws.close()


async def _files(farm: Farm) -> WsClient:
    user = (await identity.login_password(farm.db, "alice", "pw-alice")).user
    ticket, _ = await tickets.issue_files_ticket(farm.db, user, farm.alice_desk["id"])
    ws, status, _ = await WsClient.open(farm, f"/ws/files?id={farm.alice_desk['id']}&ticket={ticket}")
    assert status == 101
    return ws


async def _msg(ws: WsClient) -> dict[str, Any]:
    op, data = await ws.frame()
    assert op == 1, (op, data[:80])
    result: dict[str, Any] = json.loads(data)
    return result


def _send(ws: WsClient, **msg: Any) -> None:
    ws.send(json.dumps(msg).encode(), opcode=1)


async def test_list_upload_and_download_through_the_broker(farm: Farm, memory_files: MemoryFiles) -> None:
    await _running(farm)
    ws = await _files(farm)
    ready = {"max_upload_bytes": 1024 << 20, "files": True, "printing": True, "print_dir": "PDF"}
    assert (await _msg(ws)) == {"ready": ready}
    _send(ws, op="list", dir="Downloads")
    listing = await _msg(ws)
    assert listing["op"] == "list" and [e["name"] for e in listing["entries"]] == ["report.txt"]

    data = os.urandom(3 * 1024 * 1024 + 17)
    _send(ws, op="upload", name="photo.jpg", size=len(data))
    assert await _msg(ws) == {"op": "upload", "accepted": True}
    for i in range(0, len(data), 256 * 1024):
        ws.send(data[i : i + 256 * 1024])
    while "done" not in (reply := await _msg(ws)):
        assert reply["op"] == "upload" and 0 < reply["progress"] < len(data)
    assert reply["done"] == {"path": "Uploads/photo.jpg", "size": len(data)}
    assert memory_files.files["Uploads/photo.jpg"] == data

    _send(ws, op="download", path="Uploads/photo.jpg")
    ws.send(b"still there?", opcode=9)  # a client's keepalive ping mid-download: answered, and the download goes on
    texts, got, pongs = [], b"", []
    while not texts or "done" not in texts[-1]:
        op, payload = await ws.frame()
        if op == 1:
            texts.append(json.loads(payload))
        elif op == 2:
            got += payload
        else:
            assert op == 10, (op, payload[:80])
            pongs.append(payload)
    assert texts == [
        {"op": "download", "file": {"name": "photo.jpg", "size": len(data)}},
        {"op": "download", "done": {"size": len(data)}},
    ]
    assert got == data and pongs == [b"still there?"]
    _send(ws, op="download", path="Downloads/nope.txt")
    assert (await _msg(ws))["error"]["code"] == "not_found"
    await ws.close()


async def test_limits_names_and_cancel_refuse_cleanly_and_the_panel_goes_on(
    farm: Farm, memory_files: MemoryFiles
) -> None:
    await _running(farm)
    await config.set_config(farm.db, SYSTEM, "portal.files.max_upload_mib", 1)
    ws = await _files(farm)
    assert (await _msg(ws))["ready"]["max_upload_bytes"] == 1 << 20
    _send(ws, op="upload", name="big.iso", size=2 << 20)
    assert (await _msg(ws))["error"]["code"] == "too_large"
    ws.send(os.urandom(300_000))  # what the page had already queued: dropped, the panel goes on
    for name in ("../../etc/passwd", "a/b", "..", ""):
        _send(ws, op="upload", name=name, size=1)
        assert (await _msg(ws))["error"]["code"] == "bad_path", name
    _send(ws, op="upload", name="half.bin", size=500_000)
    assert (await _msg(ws))["accepted"]
    ws.send(os.urandom(200_000))
    _send(ws, op="cancel")
    reply = await _msg(ws)
    while "progress" in reply:
        reply = await _msg(ws)
    assert reply == {"op": "upload", "error": {"code": "cancelled", "message": "cancelled"}}
    assert memory_files.aborted == 1 and not any(p.startswith("Uploads/") for p in memory_files.files)
    _send(ws, op="fly")
    assert (await _msg(ws))["error"]["code"] == "bad_request"
    _send(ws, op="list", dir="Downloads")
    assert (await _msg(ws))["op"] == "list"
    ws.send(struct.pack("!H", 1000), opcode=8)
    assert (await ws.frame())[0] == 8
    await ws.close()


@pytest.mark.usefixtures("memory_files")
async def test_tickets_are_single_use_per_purpose_and_the_switch_closes_the_panel(farm: Farm) -> None:
    desk_id = farm.alice_desk["id"]
    user = (await identity.login_password(farm.db, "alice", "pw-alice")).user
    with pytest.raises(Conflict) as early:
        await tickets.issue_files_ticket(farm.db, user, desk_id)  # nothing to move files with yet
    assert early.value.code == "not_running"
    await _running(farm)
    connect = await connect_ticket(farm)
    _ws, status, headers = await WsClient.open(farm, f"/ws/files?id={desk_id}&ticket={connect}")
    assert (status, headers["x-deckard-error"]) == (401, "bad_ticket")  # a connect ticket opens no file panel
    files, _ = await tickets.issue_files_ticket(farm.db, user, desk_id)
    _ws, status, _ = await WsClient.open(farm, f"/ws/connect?id={desk_id}&ticket={files}")
    assert status == 401  # nor a files ticket the display
    files, _ = await tickets.issue_files_ticket(farm.db, user, desk_id)
    ws, status, _ = await WsClient.open(farm, f"/ws/files?id={desk_id}&ticket={files}")
    assert status == 101
    await ws.close()
    _ws, status, _ = await WsClient.open(farm, f"/ws/files?id={desk_id}&ticket={files}")
    assert status == 401  # used up
    bob = (await identity.login_password(farm.db, "bob", "pw-bob")).user
    with pytest.raises(PermissionDenied):
        await tickets.issue_files_ticket(farm.db, bob, desk_id)  # not his desktop

    files, _ = await tickets.issue_files_ticket(farm.db, user, desk_id)
    await config.set_config(farm.db, SYSTEM, "portal.files.enabled", False)
    await config.set_config(farm.db, SYSTEM, "portal.printing.enabled", False)
    _ws, status, headers = await WsClient.open(farm, f"/ws/files?id={desk_id}&ticket={files}")
    assert (status, headers["x-deckard-error"]) == (403, "files_disabled")
    with pytest.raises(PermissionDenied) as refused:
        await tickets.issue_files_ticket(farm.db, user, desk_id)
    assert refused.value.code == "files_disabled"


async def test_with_files_off_and_printing_on_only_print_jobs_come_through(
    farm: Farm, memory_files: MemoryFiles
) -> None:
    await _running(farm)
    memory_files.files["PDF/job-1.pdf"] = b"%PDF-1.4 printed\n"
    await config.set_config(farm.db, SYSTEM, "portal.files.enabled", False)
    ws = await _files(farm)
    ready = (await _msg(ws))["ready"]
    assert (ready["files"], ready["printing"], ready["print_dir"]) == (False, True, "PDF")
    _send(ws, op="list", dir="PDF")
    assert [e["name"] for e in (await _msg(ws))["entries"]] == ["job-1.pdf"]
    _send(ws, op="download", path="PDF/job-1.pdf")
    assert (await _msg(ws))["file"]["name"] == "job-1.pdf"
    assert await ws.binary(17) == b"%PDF-1.4 printed\n"
    assert "done" in await _msg(ws)
    for op in (
        {"op": "list", "dir": "Downloads"},
        {"op": "download", "path": "Downloads/report.txt"},
        {"op": "download", "path": "PDF/../Downloads/report.txt"},
        {"op": "upload", "name": "x", "size": 1},
    ):
        _send(ws, **op)
        assert (await _msg(ws))["error"]["code"] == "files_disabled", op
    await ws.close()
    user = (await identity.login_password(farm.db, "alice", "pw-alice")).user
    listed = await portal.list_own_desktops(farm.db, user)
    assert next(d for d in listed if d["id"] == farm.alice_desk["id"])["features"] == {
        "files": False,
        "printing": True,
        "sound": True,
    }
