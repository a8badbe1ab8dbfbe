"""Revision 0015 (tenant networks) on a farm that already has desktops, on SQLite and PostgreSQL: the desktops, OSFs
and the rows that refer to them survive the rebuild of their tables and stay on the default network with their
addresses; an address in a tenant network is unique in that network, a farm address in the farm; the revision goes
down and up again; and the migrated schema is the one ``db/schema.py`` declares.  Revision 0018 (ids never reused)
on the same farm: a deleted user's or desktop's id is not handed out again."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext

from deckard.db.engine import MIGRATIONS, sync_url
from deckard.db.schema import metadata

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A synchronous URL of an empty database (no revision applied)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'empty.db'}"
    cluster = request.getfixturevalue("pg_cluster")
    return sync_url(cluster.create_database("m_" + uuid.uuid4().hex[:12]))


def _config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def _upgrade(url: str, revision: str) -> None:
    command.upgrade(_config(url), revision)


def _downgrade(url: str, revision: str) -> None:
    command.downgrade(_config(url), revision)


@pytest.fixture
def engine(empty_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(empty_url)
    try:
        yield engine
    finally:
        engine.dispose()


def _seed_before_networks(conn: sa.Connection) -> None:
    """A tenant, a user, an OSF, a desktop and its connection history, as a farm at revision 0014 has them."""
    conn.execute(sa.text("INSERT INTO tenants (id, name, created_at) VALUES (1, 'default', :now)"), {"now": NOW})
    conn.execute(
        sa.text("INSERT INTO users (id, tenant_id, login, created_at) VALUES (1, 1, 'alice', :now)"), {"now": NOW}
    )
    conn.execute(
        sa.text("INSERT INTO osfs (id, tenant_id, name, created_at) VALUES (1, 1, 'default', :now)"), {"now": NOW}
    )
    conn.execute(
        sa.text(
            "INSERT INTO desktops (id, tenant_id, name, user_id, osf_id, ip, mac, created_at) "
            "VALUES (1, 1, 'alice-desk', 1, 1, '10.231.0.11', '54:52:00:e7:00:0b', :now)"
        ),
        {"now": NOW},
    )
    conn.execute(
        sa.text("INSERT INTO connections (id, desktop_id, user_id, started_at) VALUES (1, 1, 1, :now)"), {"now": NOW}
    )
    conn.execute(
        sa.text("INSERT INTO osf_config (osf_id, key, value, updated_at) VALUES (1, 'k', '1', :now)"), {"now": NOW}
    )


def _insert_desktop(
    conn: sa.Connection, desktop_id: int, ip: str, network_id: int | None, network_ip: str | None
) -> None:
    conn.execute(
        sa.text(
            "INSERT INTO desktops (id, tenant_id, name, user_id, osf_id, ip, mac, created_at, network_id, network_ip) "
            "VALUES (:id, 1, :name, 1, 1, :ip, '54:52:00:00:00:01', :now, :net, :net_ip)"
        ),
        {"id": desktop_id, "name": f"d{desktop_id}", "ip": ip, "now": NOW, "net": network_id, "net_ip": network_ip},
    )


def _seeded_then_upgraded(engine: sa.Engine) -> str:
    """A database at 0014 with a tenant, an OSF and a desktop, then migrated to the head; its URL."""
    url = engine.url.render_as_string(hide_password=False)
    _upgrade(url, "0014")
    with engine.begin() as conn:
        _seed_before_networks(conn)
    _upgrade(url, "head")
    return url


def test_existing_desktops_stay_on_the_default_network_with_their_history(engine: sa.Engine) -> None:
    _seeded_then_upgraded(engine)
    with engine.connect() as conn:
        desk = conn.execute(sa.text("SELECT ip, network_id FROM desktops WHERE id = 1")).one()
        assert (desk.ip, desk.network_id) == ("10.231.0.11", None)
        assert conn.execute(sa.text("SELECT desktop_id FROM connections")).scalar_one() == 1
        assert conn.execute(sa.text("SELECT network_id FROM osfs")).scalar_one() is None
        assert conn.execute(sa.text("SELECT value FROM osf_config WHERE osf_id = 1")).scalar_one() == "1"


def test_a_network_address_is_unique_in_its_network_and_a_farm_address_in_the_farm(engine: sa.Engine) -> None:
    _seeded_then_upgraded(engine)
    with engine.begin() as conn:
        for network_id in (1, 2):
            conn.execute(
                sa.text(
                    "INSERT INTO networks (id, tenant_id, name, kind, range, created_at) "
                    "VALUES (:id, 1, :name, 'private', '10.50.0.0/24', :now)"
                ),
                {"id": network_id, "name": f"n{network_id}", "now": NOW},
            )
        _insert_desktop(conn, 2, "10.231.0.12", 1, "10.50.0.11")
        _insert_desktop(conn, 3, "10.231.0.13", 2, "10.50.0.11")  # the same address in another network
    refused = [
        ("10.231.0.14", 1, "10.50.0.11"),  # taken in network 1
        ("10.231.0.11", 2, "10.50.0.12"),  # the farm address of desktop 1
        ("10.231.0.14", 1, None),  # on a network without an address there
        ("10.231.0.14", None, "10.50.0.12"),  # an address in no network
    ]
    for ip, network_id, network_ip in refused:
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
            _insert_desktop(conn, 4, ip, network_id, network_ip)


def test_the_revision_goes_down_and_up_again(engine: sa.Engine) -> None:
    url = _seeded_then_upgraded(engine)
    _downgrade(url, "0014")
    with engine.connect() as conn:
        assert "networks" not in sa.inspect(conn).get_table_names()
        assert conn.execute(sa.text("SELECT ip FROM desktops")).scalar_one() == "10.231.0.11"
    _upgrade(url, "head")


def test_the_migrated_schema_is_the_one_schema_py_declares(engine: sa.Engine) -> None:
    _upgrade(engine.url.render_as_string(hide_password=False), "head")
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), metadata)
    assert diff == []


def test_a_deleted_users_or_desktops_id_is_never_handed_out_again(engine: sa.Engine) -> None:
    """A user's id is their uid in every desktop, a desktop's names its layer: SQLite gave a deleted newest row's id
    to the next row made (revision 0018 rebuilds both tables with ``AUTOINCREMENT``; PostgreSQL never did)."""
    _seeded_then_upgraded(engine)
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":  # the seed's rows came with their ids: the sequences follow them
            for table in ("users", "desktops"):
                conn.execute(sa.text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), 1)"))
        assert conn.execute(sa.text("SELECT user_id FROM desktops WHERE id = 1")).scalar_one() == 1  # kept
        made = []
        for login in ("bob", "carol"):
            made.append(
                conn.execute(
                    sa.text("INSERT INTO users (tenant_id, login, created_at) VALUES (1, :login, :now) RETURNING id"),
                    {"login": login, "now": NOW},
                ).scalar_one()
            )
            conn.execute(sa.text("DELETE FROM users WHERE id = :id"), {"id": made[-1]})
        for n in (1, 2):
            made.append(
                conn.execute(
                    sa.text(
                        "INSERT INTO desktops (tenant_id, name, user_id, osf_id, ip, mac, created_at) "
                        "VALUES (1, :name, 1, 1, :ip, '54:52:00:00:00:01', :now) RETURNING id"
                    ),
                    {"name": f"new{n}", "ip": f"10.231.0.{20 + n}", "now": NOW},
                ).scalar_one()
            )
            conn.execute(sa.text("DELETE FROM desktops WHERE id = :id"), {"id": made[-1]})
    assert made == [2, 3, 2, 3]
