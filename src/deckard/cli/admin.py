"""The administrator's nouns of the ``deckard`` command (QVD's qa4): user, desktop, node, image, osf, network.

Every command here goes through the API with the CLI profile, never to the database.  Some nouns are shared
with ``cli/farm.py`` (``image build`` builds there): ``_group`` adds our verbs to a group that already exists
instead of registering a second group of the same name (``deckard node`` alone runs a node daemon,
``deckard node list`` lists nodes).
"""

from __future__ import annotations

import typer

from deckard.cli import (
    admins,
    audit,
    config,
    connections,
    desktops,
    images,
    login,
    networks,
    nodes,
    placement,
    pools,
    properties,
    roles,
    stats,
    tenants,
    users,
)


def _group(app: typer.Typer, name: str, help: str) -> typer.Typer:
    for info in app.registered_groups:
        if info.name == name and info.typer_instance is not None:
            return info.typer_instance
    group = typer.Typer(help=help, no_args_is_help=True)
    app.add_typer(group, name=name)
    return group


def register(app: typer.Typer) -> None:
    app.command("login")(login.login)
    app.add_typer(roles.acl_app, name="acl")
    app.add_typer(users.app, name="user")
    app.add_typer(desktops.app, name="desktop")
    app.add_typer(images.osf_app, name="osf")
    app.add_typer(networks.app, name="network")
    app.add_typer(pools.app, name="pool")
    images.add_image_commands(_group(app, "image", "Disk images (QVD's DIs)."))
    nodes.add_commands(_group(app, "node", "The farm's nodes (QVD's hosts)."))
    placement.add_node_commands(_group(app, "node", "The farm's nodes (QVD's hosts)."))
    placement.add_desktop_commands(_group(app, "desktop", "Desktops (QVD's VMs)."))
    for noun, module in (
        ("tenant", tenants),
        ("admin", admins),
        ("role", roles),
        ("audit", audit),
        ("config", config),
        ("property", properties),
        ("connection", connections),
        ("stats", stats),
    ):
        if module.app.registered_commands or module.app.registered_groups:
            app.add_typer(module.app, name=noun)
