"""Security policies in the services, through the real API (TLS, uvicorn, SQLite and PostgreSQL): what a tenant's
administrator may not do to what all tenants share, and what one client may not do to another.

Each test answers one finding of issue 8: image import reading the API host's files, unbounded uploads, a
tenant's Operator acting on the farm's nodes and seeing their host details, an administrators' lockout that locked
a whole address (or a name) out, and a deleted user's home handed to the next user with the same login.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import test_api
from alembic import command
from alembic.config import Config
from test_api import Farm, call
from test_images_admin import rootfs_tar
from test_tenancy_acl import multitenant, tenant_admin

from deckard.db import schema as t
from deckard.db.engine import MIGRATIONS
from deckard.model.entities import utcnow
from deckard.model.errors import BadInput, DeckardError, PermissionDenied
from deckard.runtime.paths import FarmPaths
from deckard.services import image_files, node_ops
from deckard.services.context import SYSTEM

farm = test_api.farm  # the real API with TLS, shared with test_api.py


def http_from(farm: Farm, address: str, token: str | None = None) -> httpx.AsyncClient:
    """A client whose connections come from ``address`` (any 127.x.y.z reaches the server on lo)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    transport = httpx.AsyncHTTPTransport(verify=farm.ssl, local_address=address)
    return httpx.AsyncClient(
        base_url=farm.url + "/api/v1", transport=transport, trust_env=False, headers=headers, timeout=60
    )


async def image_row(farm: Farm, image_id: int) -> Any:
    async with farm.db.connect() as conn:
        return (await conn.execute(sa.select(t.disk_images).where(t.disk_images.c.id == image_id))).one()


# ---- 1. image import from host paths ---------------------------------------------------------------------


async def test_a_tenant_admin_cannot_import_host_files_and_the_host_is_not_even_looked_at(
    farm: Farm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding: a tenant administrator imported /etc/shadow and another tenant's image, and a missing path said
    so.  Now: 403 ``supertenant_only`` for every path, existing or not, before any file is opened."""
    opened: list[str] = []
    real_open = image_files.open_importable
    monkeypatch.setattr(image_files, "open_importable", lambda s, r: (opened.append(s), real_open(s, r))[1])
    root = await farm.admin_client()
    await multitenant(root)
    acme = await tenant_admin(farm, root, "acme", "acme-boss", ["Tenant admin"])
    image = await call(acme.create_image, "v1")  # an upload image: allowed
    answers = []
    for path in ("/etc/shadow", "/etc/no-such-file", str(farm.ca)):
        with pytest.raises(PermissionDenied) as e:
            await call(acme.import_image, image.id, path)
        answers.append((e.value.code, e.value.message))
    assert answers[0][0] == "supertenant_only" and len(set(answers)) == 1  # no existence oracle
    with pytest.raises(PermissionDenied) as e:
        await call(acme.create_image, "v2", source="import", path="/etc/shadow")
    assert e.value.code == "supertenant_only"
    assert opened == []  # refused before any filesystem access
    assert [r.version for r in await call(acme.list_images)] == ["v1"]  # the refused create left no row
    row = await image_row(farm, image.id)
    assert row.state == "new" and row.size in (0, None)


async def test_the_supertenant_imports_only_regular_files_inside_the_import_directory(
    farm: Farm, tmp_path: Path
) -> None:
    """Outside, missing, a symlink (at the end or in the middle), ``..``, a directory or a FIFO: one and the same
    ``bad_import_path`` error, and the image is untouched; a regular file inside is imported."""
    root = await farm.admin_client()
    inbox = tmp_path / "import"
    inbox.mkdir(exist_ok=True)
    (inbox / "good.tar.gz").write_bytes(rootfs_tar(2000))
    outside = tmp_path / "outside.tar.gz"
    outside.write_bytes(rootfs_tar(2000))
    (inbox / "link.tar.gz").symlink_to(outside)
    (inbox / "etc").symlink_to("/etc")
    (inbox / "sub").mkdir()
    os.mkfifo(inbox / "fifo")
    image = await call(root.create_image, "v1")
    refused = [
        "/etc/hostname",
        "/etc/definitely-missing",
        str(outside),
        str(inbox / "missing.tar.gz"),
        str(inbox / "link.tar.gz"),
        str(inbox / "etc" / "hostname"),
        str(inbox / ".." / "outside.tar.gz"),
        str(inbox / "sub"),
        str(inbox / "fifo"),
        "good.tar.gz",
    ]
    codes = set()
    for path in refused:
        with pytest.raises(BadInput) as e:
            await call(root.import_image, image.id, path)
        codes.add(e.value.code)
        assert e.value.message.startswith(repr(path)) and "import directories" in e.value.message
    assert codes == {"bad_import_path"}
    row = await image_row(farm, image.id)
    assert row.state == "new" and not (tmp_path / "storage" / "images" / f"{image.id}.partial").exists()
    ok = await call(root.import_image, image.id, str(inbox / "good.tar.gz"))
    assert ok.state == "ready" and ok.size == len(rootfs_tar(2000))


async def test_import_by_path_is_off_when_the_farm_owner_configures_no_import_directory(farm: Farm) -> None:
    root = await farm.admin_client()
    image = await call(root.create_image, "v1")
    with pytest.raises(PermissionDenied) as e:
        await image_files.import_image(
            farm.db, SYSTEM, image.id, "/etc/hostname", images_dir=Path("/nonexistent"), import_dirs=()
        )
    assert e.value.code == "import_disabled"


async def test_uploads_are_capped_per_tenant_and_the_partial_file_is_removed(farm: Farm, tmp_path: Path) -> None:
    """Finding: uploads had no size limit.  ``image.max_upload_mib`` is the image's tenant's, only the farm's
    administrators set it, a declared size over it is refused up front and a streamed body is cut off: 413."""
    root = await farm.admin_client()
    await multitenant(root)
    acme = await tenant_admin(farm, root, "acme", "acme-boss", ["Tenant admin"])
    with pytest.raises(PermissionDenied) as e:
        await call(acme.set_config, "image.max_upload_mib", 100000)
    assert e.value.code == "supertenant_only"  # a tenant cannot raise its own limit
    await call(root.set_config, "image.max_upload_mib", 1, tenant="acme")
    partial = tmp_path / "storage" / "images"
    big = os.urandom(3 << 19)  # 1.5 MiB

    image = await call(acme.create_image, "big")
    with pytest.raises(DeckardError) as err:  # Content-Range says 1.5 MiB: refused before a byte is written
        await call(acme.upload_image_chunk, image.id, big[:1000], start=0, total=len(big))
    assert err.value.status == 413 and err.value.code == "upload_too_large"
    assert (await call(acme.get_image, image.id)).state == "new"

    async def stream() -> AsyncIterator[bytes]:  # no Content-Length: only the running count can stop it
        for i in range(0, len(big), 1 << 16):
            yield big[i : i + (1 << 16)]

    token = acme.token
    async with farm.http(token) as http:
        r = await http.put(
            f"/images/{image.id}/content", content=stream(), headers={"Content-Type": "application/octet-stream"}
        )
        assert r.status_code == 413 and r.json()["error"]["code"] == "upload_too_large"
        r = await http.put(f"/images/{image.id}/content", content=big)  # with Content-Length
        assert r.status_code == 413
    assert not (partial / f"{image.id}.partial").exists()
    assert (await call(acme.get_image, image.id)).uploaded_bytes == 0

    small = rootfs_tar(300_000)
    row = await call(acme.upload_image_chunk, image.id, small, start=0, total=len(small))
    assert row.state == "ready"  # the same image takes a tarball within the limit
    other = await call(root.create_image, "big-default")  # the default tenant keeps the farm's default
    async with farm.http(root.token) as http:
        r = await http.put(f"/images/{other.id}/content", content=big)
    assert r.status_code != 413


# ---- 2. node actions and node details -------------------------------------------------------------------


async def a_node(farm: Farm) -> int:
    return await node_ops.register_node(
        farm.db, "shared-node", "10.231.0.1", "https://10.231.0.1:8443", cpus=4, mem_total_mib=8192, mem_free_mib=4096
    )


async def node_row(farm: Farm, node_id: int) -> Any:
    async with farm.db.connect() as conn:
        return (await conn.execute(sa.select(t.nodes).where(t.nodes.c.id == node_id))).one()


async def test_a_tenants_operator_cannot_act_on_the_shared_node_and_sees_no_host_details(farm: Farm) -> None:
    """Finding: acme's Operator (whose role grants ``node.block``) blocked the farm's node and saw its pid and
    addresses.  Now every node action is 403 ``supertenant_only`` and the node shows id, name, state, blocked."""
    node_id = await a_node(farm)
    async with farm.db.begin() as conn:
        await conn.execute(sa.update(t.nodes).where(t.nodes.c.id == node_id).values(state="running"))
    root = await farm.admin_client()
    await multitenant(root)
    ops = await tenant_admin(farm, root, "acme", "acme-ops", ["Operator"])
    assert "node.block" in (await call(ops.whoami)).acls
    for action in ("block", "unblock"):
        with pytest.raises(PermissionDenied) as e:
            await call(getattr(ops, f"{action}_node"), "shared-node")
        assert e.value.code == "supertenant_only"
    root_role = await tenant_admin(farm, root, "acme", "acme-root", ["Root"])  # even a tenant role granting node.*
    for action in ("drain", "evacuate", "stop", "restart"):
        with pytest.raises(PermissionDenied) as e:
            await call(root_role.node_action, "shared-node", action)
        assert e.value.code == "supertenant_only"
    row = await node_row(farm, node_id)
    assert row.blocked is False and row.cmd is None  # nothing changed

    seen = await call(ops.get_node, "shared-node")
    assert seen.model_fields_set <= {"id", "name", "state", "blocked"} and seen.name == "shared-node"
    listed = await call(ops.list_nodes)
    assert all(n.model_fields_set <= {"id", "name", "state", "blocked"} for n in listed)
    with pytest.raises(PermissionDenied) as e:
        await call(ops.list_nodes, [("pid__gt", "0")])
    assert e.value.code == "forbidden_filter"

    full = await call(root.get_node, "shared-node")
    assert full.address == "10.231.0.1" and full.pid == os.getpid()  # the farm's administrators see it all
    assert (await call(root.block_node, "shared-node")).blocked is True
    assert (await call(root.node_action, "shared-node", "drain")).blocked is True


# ---- 3. administrators' lockout ------------------------------------------------------------------------


async def login(http: httpx.AsyncClient, name: str, password: str) -> httpx.Response:
    return await http.post("/auth/login", json={"name": name, "password": password})


async def end_waits(farm: Farm) -> None:
    """Let time pass: every current wait is over (the counts stay)."""
    async with farm.db.begin() as conn:
        past = utcnow() - dt.timedelta(seconds=1)
        await conn.execute(
            sa.update(t.login_failures).where(t.login_failures.c.locked_until.is_not(None)).values(locked_until=past)
        )


async def test_failed_logins_slow_down_one_address_for_one_account_not_the_account(farm: Farm) -> None:
    """Finding: failures locked the source address and the name, so anyone could lock every administrator behind
    a NAT (or any known name) out.  Now the (account, address) pair waits 2, 4 … s with 429 and Retry-After,
    while the right password from another address still works; an unknown name is treated the same."""
    root = await farm.admin_client()
    await call(root.set_config, "auth.lockout.failures", 3)
    async with http_from(farm, "127.0.0.2") as attacker, http_from(farm, "127.0.0.3") as admin_elsewhere:
        for name in ("admin", "nobody"):
            codes = [(await login(attacker, name, "wrong")).status_code for _ in range(2)]
            assert codes == [401, 401]
            r = await login(attacker, name, "wrong")
            assert r.status_code == 429 and r.json()["error"]["code"] == "login_locked"
            assert r.headers["Retry-After"] == "2" and r.json()["error"]["details"]["retry_after_s"] == 2
        r = await login(attacker, "admin", farm.password)  # waiting: not even the right password
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        r = await login(admin_elsewhere, "admin", farm.password)  # the account is not locked
        assert r.status_code == 200, r.text
        await end_waits(farm)
        r = await login(attacker, "admin", "wrong")
        assert r.status_code == 429 and r.headers["Retry-After"] == "4"  # exponential
        await end_waits(farm)
        assert (await login(attacker, "admin", farm.password)).status_code == 200  # the right one clears the pair
        assert (await login(attacker, "admin", "wrong")).status_code == 401


async def test_an_address_that_fails_against_many_accounts_is_slowed_for_all_of_them(farm: Farm) -> None:
    root = await farm.admin_client()
    await call(root.set_config, "auth.lockout.source_failures", 4)
    async with http_from(farm, "127.0.0.4") as sprayer, http_from(farm, "127.0.0.5") as neighbour:
        for name in ("a1", "a2", "a3"):
            assert (await login(sprayer, name, "wrong")).status_code == 401
        r = await login(sprayer, "a4", "wrong")
        assert r.status_code == 429 and "Retry-After" in r.headers
        assert (await login(sprayer, "admin", farm.password)).status_code == 429
        assert (await login(neighbour, "admin", farm.password)).status_code == 200


# ---- 4. a deleted user's home ----------------------------------------------------------------------------


async def user_home(farm: Farm, tmp_path: Path, login: str) -> Path:
    async with farm.db.connect() as conn:
        key = (await conn.execute(sa.select(t.users.c.home_key).where(t.users.c.login == login))).scalar_one()
    return FarmPaths(tmp_path).user_home("default", key)


async def test_deleting_a_user_archives_their_home_and_a_new_user_with_the_login_starts_empty(
    farm: Farm, tmp_path: Path
) -> None:
    """Finding: a new user with a deleted user's login got the old home (mode-600 files too).  Now the home is
    named per account, deleting the user moves it to homes-archive (audited with the path), and a new alice gets
    a home of her own; with ``users.home_on_delete = delete`` it is removed."""
    root = await farm.admin_client()
    await call(root.create_user, "alice", "pass1234")
    home = await user_home(farm, tmp_path, "alice")
    assert home.name.startswith("alice+") and home.parent == tmp_path / "storage" / "homes" / "default"
    home.mkdir(parents=True)
    (home / ".ssh").mkdir()
    secret = home / ".ssh" / "id_ed25519"
    secret.write_text("private")
    secret.chmod(0o600)

    await call(root.delete_user, "alice")
    assert not home.exists()
    archived = list((tmp_path / "storage" / "homes-archive" / "default").iterdir())
    assert len(archived) == 1 and archived[0].name.startswith("alice-")
    assert (archived[0] / ".ssh" / "id_ed25519").read_text() == "private"
    records = (await call(root.list_audit, {"action": "user.home.archive"})).items
    assert records and records[0].arguments["archived_to"] == str(archived[0])
    assert records[0].arguments["home"] == str(home)

    await call(root.create_user, "alice", "pass1234")
    new_home = await user_home(farm, tmp_path, "alice")
    assert new_home != home and not new_home.exists()

    await call(root.set_config, "users.home_on_delete", "delete", tenant="default")
    new_home.mkdir(parents=True)
    (new_home / "notes").write_text("x")
    await call(root.delete_user, "alice")
    assert not new_home.exists()
    assert len(list((tmp_path / "storage" / "homes-archive" / "default").iterdir())) == 1  # only the first
    records = (await call(root.list_audit, {"action": "user.home.delete"})).items
    assert records and records[0].arguments["home"] == str(new_home)
    with pytest.raises(BadInput):
        await call(root.set_config, "users.home_on_delete", "keep")


async def test_a_user_with_a_desktop_is_not_deleted_and_keeps_their_home(farm: Farm, tmp_path: Path) -> None:
    root = await farm.admin_client()
    await call(root.create_user, "bob", "pass1234")
    home = await user_home(farm, tmp_path, "bob")
    home.mkdir(parents=True)
    await call(root.create_desktop, "bob-desk", "bob")
    with pytest.raises(DeckardError) as e:
        await call(root.delete_user, "bob")
    assert e.value.code == "has_dependents" and home.is_dir()
    assert not (tmp_path / "storage" / "homes-archive").exists()


def test_migration_0003_keeps_the_homes_of_existing_users_where_they_are(tmp_path: Path) -> None:
    """Users that existed before 0003 are keyed by their login (their home does not move); new ones are not."""
    url = f"sqlite:///{tmp_path / 'upgrade.db'}"
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url)
    command.upgrade(cfg, "0002")
    engine = sa.create_engine(url)
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO tenants (id, name, created_at) VALUES (1, 'default', :now)"), {"now": now})
        conn.execute(
            sa.text("INSERT INTO users (tenant_id, login, created_at) VALUES (1, 'carol', :now)"), {"now": now}
        )
    command.upgrade(cfg, "heads")
    with engine.begin() as conn:
        assert conn.execute(sa.text("SELECT home_key FROM users")).scalar_one() == "carol"
        conn.execute(sa.insert(t.users).values(tenant_id=1, login="dave", created_at=now))
        dave = conn.execute(sa.select(t.users.c.home_key).where(t.users.c.login == "dave")).scalar_one()
    engine.dispose()
    assert dave.startswith("dave+") and len(dave) == len("dave+") + 12
    paths = FarmPaths(tmp_path)
    assert paths.user_home("default", "carol") == tmp_path / "storage" / "homes" / "default" / "carol"
    with pytest.raises(ValueError):
        paths.user_home("default", "..")
