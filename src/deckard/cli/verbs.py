"""The verbs every admin noun repeats, made once: ``list`` (with the shared list options and printing) and
the verbs on one object (``show``, ``block``, ``delete`` …: call the client, confirm, print the object).

Why: each noun module used to spell out the same commands — the same seven options of a list, the same
``with session.api(...)`` / print sequence per verb — and they drifted (some lists had no ``--filter``, some
read only the first page).  A noun now names its verbs here and keeps only what is its own.

Typer reads a command's options from its signature; the commands made here get theirs as an
``inspect.Signature`` so each noun keeps its own argument name and help text.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import typer

from deckard.cli import session
from deckard.cli.filters import (
    FieldsOpt,
    FilterOpt,
    Identified,
    PageOpt,
    PerPageOpt,
    SortOpt,
    fetch_list,
    list_params,
    print_page,
    report_bulk,
    run_bulk,
)
from deckard.cli.output import Shown, fields, print_done, print_json, print_object
from deckard.cli.session import JsonOpt, ProfileOpt
from deckard.client.api import ApiClient
from deckard.model.schemas import Schema

Command = Callable[..., None]
S = TypeVar("S", bound=Schema)


def fetch_and_print(profile: Any, as_json: bool, fetch: Callable[[ApiClient], S], render: Callable[[S], None]) -> S:
    """A read-only verb with its own layout: ``fetch`` from the API, then JSON for scripts or ``render`` it."""
    with session.api(profile) as api:
        out = fetch(api)
    if as_json:
        print_json(out)
    else:
        render(out)
    return out


def option(name: str, annotation: Any, default: Any = None) -> inspect.Parameter:
    """A command parameter (``annotation`` is an ``Annotated[..., typer.Option(...)]``)."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)


def _command(run: Callable[..., None], doc: str, params: Sequence[inspect.Parameter]) -> Command:
    def command(**kwargs: Any) -> None:
        run(**kwargs)

    command.__doc__ = doc
    command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [*params, option("as_json", JsonOpt, False), option("profile", ProfileOpt)]
    )
    return command


def list_command(
    resource: str,
    schema: type[Schema],
    columns: Sequence[str],
    doc: str,
    *,
    per_page: int | None = None,
    query: Sequence[inspect.Parameter] = (),
    table_row: Callable[[Any], Shown] | None = None,
) -> Command:
    """``deckard <noun> list``: ``--filter``/``--sort``/``--page``/``--per-page``/``--fields``; every row unless a
    page is asked for (``per_page`` sets a default page size); ``query`` adds options sent as they are;
    ``table_row`` makes an item's table row (see ``print_page``)."""

    def run(
        filters: list[str] | None,
        sort: str | None,
        page: int | None,
        per_page: int | None,
        fields: str | None,
        as_json: bool,
        profile: Any,
        **extra: Any,
    ) -> None:
        params = list_params(filters, sort, page, per_page, fields)
        params += [(k, str(v)) for k, v in extra.items() if v is not None]
        with session.api(profile) as api:
            result = fetch_list(api, resource, schema, params)
        print_page(result, columns, fields, as_json=as_json, table_row=table_row)

    options = [
        option("filters", FilterOpt),
        option("sort", SortOpt),
        option("page", PageOpt),
        option("per_page", PerPageOpt, per_page),
        option("fields", FieldsOpt),
    ]
    return _command(run, doc, [*query, *options])


Done = str | Callable[[Any], str]
Follow = Callable[..., list[Any] | None]


def _message(done: Done, ref: Any, obj: Schema | None, given: dict[str, Any] | None = None) -> str:
    """The confirmation: ``done`` formatted with ``ref``, the options the user gave and the object's fields."""
    if callable(done):
        return done(obj)
    return done.format(**{**(given or {}), "ref": ref, **(fields(obj) if obj is not None else {})})


def object_command(
    arg: Any,
    act: Callable[..., Schema | None],
    doc: str,
    done: Done | None = None,
    params: Sequence[inspect.Parameter] = (),
) -> Command:
    """A verb on one object: ``act(api, ref, **params)`` on the ``arg`` the user named.

    ``done`` is the confirmation: formatted with ``ref`` and the object's fields (``"tenant {name!r} blocked"``),
    or a function of the object; without it the command shows the object.
    """

    def run(ref: Any, as_json: bool, profile: Any, **extra: Any) -> None:
        with session.api(profile) as api:
            obj = act(api, ref, **extra)
        if done is None and obj is not None:
            print_object(obj, as_json=as_json)
        else:
            print_done(_message(done or "", ref, obj, extra), obj, as_json=as_json)

    ref = inspect.Parameter("ref", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=arg)
    return _command(run, doc, [ref, *params])


def _id_of(obj: Schema) -> int:
    return int(getattr(obj, "id"))  # noqa: B009 (every object an action answers with has its id)


def bulk_command(
    resource: str,
    action: str,
    arg: Any,
    single: Callable[[ApiClient, str], Schema | None],
    find: Callable[[ApiClient, str], Identified],
    doc: str,
    done: Done,
    *,
    params: Sequence[inspect.Parameter] = (),
    follow: Follow | None = None,
) -> Command:
    """An action verb on one object (its own endpoint), on several, or on every object matching ``--filter``
    (the bulk endpoint, one result line per object).

    ``follow(api, ids, **params)``, when given, waits for what the action set going to finish and returns the
    objects as they ended (``None``: nothing to wait for); single and bulk paths are followed alike.
    """

    def run(refs: list[str] | None, filters: list[str] | None, as_json: bool, profile: Any, **extra: Any) -> None:
        with session.api(profile) as api:
            if refs and len(refs) == 1 and not filters:
                obj = single(api, refs[0])
                ended = follow(api, [_id_of(obj)], **extra) if follow and obj is not None else None
                obj = ended[0] if ended else obj
                print_done(_message(done, refs[0], obj), obj, as_json=as_json)
                return
            out = run_bulk(api, resource, action, refs, filters, lambda ref: find(api, ref))
            ended = follow(api, out.ok, **extra) if follow else None
        if ended is not None and not as_json:
            for obj in ended:
                typer.echo(_message(done, obj, obj))
        report_bulk(out, resource, action, as_json=as_json, objects=ended)

    refs = inspect.Parameter("refs", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=arg, default=None)
    return _command(run, doc, [refs, option("filters", FilterOpt), *params])
