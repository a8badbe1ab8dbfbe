"""``deckard property get|set|unset``: custom key/value properties of users, desktops, OSFs, images and nodes."""

from __future__ import annotations

from typing import Annotated

import typer

from deckard.cli import session
from deckard.cli.output import print_done, print_object
from deckard.cli.session import JsonOpt, ProfileOpt

app = typer.Typer(help="Custom properties of objects.", no_args_is_help=True)

TypeArg = Annotated[str, typer.Argument(help="user, desktop, osf, image or node.")]
IdArg = Annotated[int, typer.Argument(help="The object's id.")]


@app.command("get")
def get(object_type: TypeArg, object_id: IdArg, as_json: JsonOpt = False, profile: ProfileOpt = None) -> None:
    """Show an object's properties."""
    with session.api(profile) as api:
        props = api.get_properties(object_type, object_id)
    print_object(props, as_json=as_json)


@app.command("set")
def set_(
    object_type: TypeArg,
    object_id: IdArg,
    pairs: Annotated[list[str], typer.Argument(help="key=value (several allowed).")],
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Set properties (other keys are kept)."""
    values: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise typer.BadParameter(f"{pair!r}: use key=value")
        values[key] = value
    with session.api(profile) as api:
        props = api.set_properties(object_type, object_id, values)
    print_done(f"{len(values)} properties set on {object_type} {object_id}", props, as_json=as_json)


@app.command("unset")
def unset(
    object_type: TypeArg,
    object_id: IdArg,
    key: Annotated[str, typer.Argument(help="The property to remove.")],
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
) -> None:
    """Remove a property."""
    with session.api(profile) as api:
        api.delete_property(object_type, object_id, key)
    print_done(f"property {key!r} removed from {object_type} {object_id}", as_json=as_json)
