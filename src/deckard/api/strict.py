"""Strict input: one base model for request bodies, one type for "an id or a name", one check of path ids.

Why: services look objects up with ``int(ref) if ref.isdigit() else name`` — convenient, but ``isdigit()`` is
true for a full-width 1 (taken as id 1) and ``²`` (``int()`` raises), and a 25-digit id overflows SQLite's
INTEGER in the middle of a query (a 500 that drops the keep-alive connection).  Refusing such input here, with the field
named, keeps the services simple and every route consistent:

* ``RequestModel``: the base of every request body; unknown fields are refused (a typo is not ignored).
* ``Ref``: a body or query field holding an id or a name; numeric-looking text must be an ASCII id (``model/ids.py``).
* ``check_path_refs``: a dependency on the whole ``/api/v1`` router that applies the same rule to every path
  parameter, including routes declared with ``int`` ids (pydantic accepts ints of any size).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from deckard.model.errors import BadInput
from deckard.model.ids import ID_MAX, looks_numeric, parse_id


class RequestModel(BaseModel):
    """A request body: unknown fields are a 422 naming them."""

    model_config = ConfigDict(extra="forbid")


def _ref(value: str) -> str:
    if looks_numeric(value):
        try:
            parse_id(value)
        except BadInput:
            # a ValueError becomes pydantic's error for this field: the 422 names where it was
            raise ValueError(f"an id must be ASCII digits between 1 and {ID_MAX}") from None
    return value


Ref = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_ref)]
"""An object named by id or by name (``"7"`` or ``"web"``)."""

Id = Annotated[int, Field(ge=1, le=ID_MAX)]
"""An object id in a body (a JSON number)."""


def _int_params(request: Request) -> set[str]:
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    params = getattr(dependant, "path_params", ())
    return {p.name for p in params if p.field_info.annotation is int}


def check_path_refs(request: Request) -> None:
    """Refuse a path parameter that is not an ASCII id (1 .. ``ID_MAX``) where one is meant (422 ``bad_input``).

    An id is meant where the route declares an ``int`` (pydantic would also take ``+5``, ``1_000`` and any
    size) or where the text looks numeric to a service's ``isdigit()`` lookup.
    """
    errors = []
    ints = _int_params(request)
    for name, value in request.path_params.items():
        if isinstance(value, str) and (name in ints or looks_numeric(value)):
            try:
                parse_id(value, name)
            except BadInput as e:
                errors.append({"loc": ("path", name), "msg": e.message, "type": "id_out_of_range", "input": value})
    if errors:
        raise RequestValidationError(errors)
