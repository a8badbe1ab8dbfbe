"""``deckard role …`` and ``deckard acl list``: roles bundle ACL grants (positive or negative) and inherit roles.

``grant``/``revoke`` edit one grant at a time: the CLI reads the role, changes its grant list and writes it back.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from deckard.cli import session
from deckard.cli.output import fields, print_done, print_object, print_rows
from deckard.cli.session import JsonOpt, ProfileOpt
from deckard.cli.verbs import list_command, object_command
from deckard.model.schemas import Role

app = typer.Typer(help="Roles: bundles of ACL grants that administrators hold.", no_args_is_help=True)
acl_app = typer.Typer(help="The ACL catalogue.", no_args_is_help=True)

COLUMNS = ("id", "name", "tenant_id", "fixed", "inherits", "description")
RoleArg = Annotated[str, typer.Argument(help="Name or id of the role.")]
AclArg = Annotated[str, typer.Argument(help="An ACL or a pattern: desktop.start, desktop.*, *.see.")]


def _grants(role: Role) -> list[tuple[str, bool]]:
    return [(g.acl, g.positive) for g in role.grants]


app.command("list")(list_command("roles", Role, COLUMNS, "List roles."))


@app.command("show")
def show(role: RoleArg, as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """Show a role: its grants, what it inherits and its effective ACLs."""
    with session.api(profile) as api:
        row = api.get_role(role)
    if as_json:
        print_object(row, as_json=True)
    else:
        print_object(
            {**fields(row), "grants": [("+" if g.positive else "-") + g.acl for g in row.grants]}, as_json=False
        )


@app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="Name of the new role.")],
    description: Annotated[str, typer.Option("--description", "-d")] = "",
    inherit: Annotated[list[str] | None, typer.Option("--inherit", "-i", help="A role to inherit (repeat).")] = None,
    tenant: Annotated[str | None, typer.Option("--tenant", "-t", help="Tenant (supertenant admins only).")] = None,
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Create a role."""
    with session.api(profile) as api:
        parents = [api.get_role(r).id for r in inherit or []]
        row = api.create_role(name, description=description, inherits=parents, tenant=tenant)
    print_done(f"role {row.name!r} created (id {row.id})", row, as_json=as_json)


def _set_grant(role: str, acl: str, positive: bool | None, profile: Any, as_json: bool) -> None:
    with session.api(profile) as api:
        current = [g for g in _grants(api.get_role(role)) if g[0] != acl]
        if positive is not None:
            current.append((acl, positive))
        row = api.update_role(role, grants=current)
    verb = "revoked from" if positive is None else ("granted to" if positive else "denied to")
    print_done(f"{acl} {verb} role {row.name!r}", row, as_json=as_json)


@app.command("grant")
def grant(
    role: RoleArg,
    acl: AclArg,
    deny: Annotated[
        bool, typer.Option("--deny", help="A negative grant: the ACL is taken away, whatever else grants it.")
    ] = False,
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Grant (or with --deny, negate) an ACL in a role."""
    _set_grant(role, acl, not deny, profile, as_json)


@app.command("revoke")
def revoke(role: RoleArg, acl: AclArg, as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """Remove a grant (positive or negative) from a role."""
    _set_grant(role, acl, None, profile, as_json)


@app.command("inherit")
def inherit(
    role: RoleArg,
    parent: Annotated[list[str], typer.Argument(help="The roles it inherits from (replaces the old list).")],
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Set the roles a role inherits from."""
    with session.api(profile) as api:
        parents = [api.get_role(p).id for p in parent]
        row = api.update_role(role, inherits=parents)
    print_done(f"role {row.name!r} now inherits {', '.join(parent)}", row, as_json=as_json)


app.command("delete")(
    object_command(
        RoleArg,
        lambda api, ref: api.delete_role(ref),
        "Delete a role (predefined roles cannot be deleted).",
        "role {ref!r} deleted",
    )
)


@acl_app.command("list")
def list_acls(as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """List every ACL name."""
    with session.api(profile) as api:
        rows = api.list_acls()
    print_rows(rows, ("name", "object", "gated_field"), as_json=as_json)
