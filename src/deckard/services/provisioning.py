"""Auto-provisioning (QVD's Auto plugin): a person the directory or SSO accepted, with no Deckard account yet,
gets one at their first login — and a first desktop from ``auth.auto.osf`` — so a new employee's first click
gives a desktop.  Only when the tenant turned it on (``auth.auto.enabled``); both creations are audited as the
``auth.auto`` actor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
import structlog

from deckard.auth.chain import Identity
from deckard.db import schema as t
from deckard.db.engine import Database
from deckard.model.acls import ACLS
from deckard.model.errors import Conflict
from deckard.services.audit import append_audit
from deckard.services.context import Actor
from deckard.services.desktops import create_desktop
from deckard.services.users import check_login, create_user

log = structlog.get_logger("deckard.provisioning")


async def provision(
    db: Database, tenant_id: int, identity: Identity, config: Mapping[str, Any], *, network: str
) -> None:
    """Create the user (and their first desktop when ``auth.auto.osf`` names an OSF).  Two first logins at once
    both end with the one account: the loser of the race finds it made."""
    check_login(identity.login)
    actor = Actor("system", None, tenant_id, "auth.auto", ACLS)
    try:
        user = await create_user(db, actor, identity.login, None, tenant_id=tenant_id)
    except Conflict:
        return
    async with db.begin() as conn:
        await conn.execute(
            sa.update(t.users)
            .where(t.users.c.id == user["id"])
            .values(
                origin=identity.plugin,
                external_id=identity.external_id[:255],
                display_name=identity.display_name[:128],
                mail=identity.mail[:254],
            )
        )
    await _audit(
        db, tenant_id, "user.create", "user", str(user["id"]), {"login": identity.login, "via": identity.plugin}
    )
    osf = str(config["auth.auto.osf"])
    if not osf:
        return
    desktop = await create_desktop(
        db, actor, identity.login, user["id"], network=network, osf=osf, tag=str(config["auth.auto.tag"])
    )
    await _audit(db, tenant_id, "desktop.create", "desktop", str(desktop["id"]), {"osf": osf, "user": identity.login})
    log.info("auth.auto.provisioned", login=identity.login, tenant_id=tenant_id, desktop=desktop["id"])


async def _audit(db: Database, tenant_id: int, action: str, kind: str, object_id: str, args: dict[str, Any]) -> None:
    await append_audit(
        db,
        action=action,
        result="ok",
        admin_name="auth.auto",
        tenant_id=tenant_id,
        object_type=kind,
        object_id=object_id,
        arguments=args,
        status=201,
    )
