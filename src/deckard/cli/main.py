"""The ``deckard`` command: one Typer app, one module per noun (ARCHITECTURE.md §3, QVD's qa4).

Every admin action goes through the API client; only ``up``, ``node``, ``api`` and ``image build`` (which run
the farm's own processes) touch the farm directly.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="deckard",
    help="Deckard: Linux virtual desktops (LXC containers) behind a QVD-protocol broker.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    from deckard.cli import admin, connect, farm, identity, storage, volumes

    farm.register(app)
    admin.register(app)
    identity.register(app)
    connect.register(app)
    app.add_typer(volumes.app, name="volume")
    app.add_typer(storage.app, name="storage")


def main() -> None:
    _register()
    app()


if __name__ == "__main__":
    main()
