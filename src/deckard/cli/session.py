"""How an admin command reaches the API and reports a failure: one client per command, made from the CLI
profile, and one rule for errors (``error [code]: message`` in red on stderr, exit status 1).

Tests replace ``open_client`` (``monkeypatch.setattr(session, "open_client", ...)``) to drive the commands
against a test double; commands therefore call it through this module, never import the name.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from deckard.client.api import ApiClient
from deckard.client.profile import PROFILE_ENV, load_profile
from deckard.model.errors import DeckardError

ERROR_EXIT = 1  # every failure the API reports; Click uses 2 for usage errors

ProfileOpt = Annotated[
    Path | None,
    typer.Option(
        "--profile",
        envvar=PROFILE_ENV,
        show_envvar=True,
        help="CLI profile (API URL, token, CA); default ~/.config/deckard/profile.json.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


# how every --password is given: its environment variable, or asked for without echo
PROMPTED: dict[str, Any] = {"show_envvar": True, "prompt": True, "hide_input": True}


errors = Console(stderr=True, highlight=False, soft_wrap=True)  # one line per error, for scripts


def open_client(profile: Path | None) -> ApiClient:
    found = load_profile(profile)
    return ApiClient(found.url, found.token, found.ca)


def report(err: DeckardError) -> None:
    errors.print(Text(f"error [{err.code}]: {err.message}", style="red"))


@contextmanager
def api(profile: Path | None) -> Iterator[ApiClient]:
    """The client for one command; an API error ends the command with ``ERROR_EXIT``."""
    try:
        client = open_client(profile)
        try:
            yield client
        finally:
            client.close()
    except DeckardError as e:
        report(e)
        raise typer.Exit(ERROR_EXIT) from None
