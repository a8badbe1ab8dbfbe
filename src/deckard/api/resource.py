"""One pattern for the routes every resource repeats: list, show, change, delete and actions on one object.

Why: each resource module used to spell out the same routes (find the object by id or name with the actor's
checks, call the service, validate the row into the resource's schema, answer 204 on delete), and the copies
drifted (one resolved names before the ACL check, another after).  Now a resource module says what its service
calls are; ``ObjectRoutes`` declares the routes with the resource's path parameter (``{desktop}``), its schema
(``model/schemas.py``) and its summaries, and every object route finds the object the same way: ``find``
turns the path's id or name into the service's key, refusing (404) what the actor may not see.

The endpoints are made here, so their parameters are declared as an ``inspect.Signature`` (FastAPI reads it):
the path parameter keeps the resource's name in the OpenAPI document and in the audit log.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Annotated, Any, Generic, TypeVar

from fastapi import APIRouter, Depends, Query, Request, Response, status
from pydantic import BaseModel

from deckard.api.deps import Scope, ScopeDep
from deckard.model.schemas import Page, Schema
from deckard.services.listing import ListQuery, parse_list_query

S = TypeVar("S", bound=Schema)
B = TypeVar("B", bound=BaseModel)
Row = dict[str, Any]

Lister = Callable[[Scope, ListQuery], Awaitable[tuple[list[Row], int]]]
Finder = Callable[[Scope, str], Awaitable[Any]]
Call = Callable[[Scope, Any], Awaitable[Row]]
Patch = Callable[[Scope, Any, B], Awaitable[Row]]
Delete = Callable[[Scope, Any], Awaitable[None]]


def list_query(allowed: Collection[str], own: Collection[str] = ()) -> Any:
    """A dependency that parses a list route's query string (documented parameters plus field filters); ``own``
    names the route's own query parameters, which are not filters."""

    def parse(
        request: Request,
        sort: Annotated[str | None, Query(description="Fields, comma-separated; '-' for descending.")] = None,
        page: Annotated[int | None, Query(ge=1)] = None,
        per_page: Annotated[int | None, Query(ge=1, le=1000)] = None,
        fields: Annotated[str | None, Query(description="Only these fields, comma-separated.")] = None,
    ) -> ListQuery:
        del sort, page, per_page, fields  # documented here, parsed with the filters below
        return parse_list_query([(k, v) for k, v in request.query_params.multi_items() if k not in own], allowed)

    return Depends(parse)


def _param(name: str, annotation: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation)


@dataclass(frozen=True)
class ObjectRoutes(Generic[S]):
    """The routes of one resource, on its router.

    ``find`` maps the path's id or name to what the service calls take (an id, after the actor's checks);
    without it the path's text goes to the service as it is.  ``exclude_unset`` leaves out of answers the
    fields a service did not return (those the administrator may not see), as the resource always has.
    """

    router: APIRouter
    noun: str
    schema: type[S]
    find: Finder | None = None
    param: str = ""  # the path parameter's name when it is not the noun (``{image_id}``)
    ref_type: type = str
    exclude_unset: bool = False

    @property
    def _ref(self) -> str:
        return self.param or self.noun

    async def _key(self, scope: Scope, ref: Any) -> Any:
        return ref if self.find is None else await self.find(scope, ref)

    def _add(
        self, method: str, path: str, name: str, summary: str, params: list[inspect.Parameter], run: Any, **route: Any
    ) -> None:
        async def endpoint(**kwargs: Any) -> Any:
            return await run(**kwargs)

        endpoint.__name__ = name
        endpoint.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        self.router.add_api_route(path, endpoint, methods=[method], name=name, summary=summary, **route)

    def _on_object(
        self,
        method: str,
        suffix: str,
        name: str,
        summary: str,
        run: Any,
        body: type[BaseModel] | None = None,
        **route: Any,
    ) -> None:
        """A route on one object: ``run(scope, key[, body])`` gets the object's key from ``find``."""

        async def found(**kwargs: Any) -> Any:
            scope: Scope = kwargs.pop("scope")
            return await run(scope, await self._key(scope, kwargs.pop(self._ref)), **kwargs)

        params = [_param(self._ref, self.ref_type), _param("scope", ScopeDep)]
        if body is not None:
            params.append(_param("body", body))
        if "response_class" not in route:
            route.update(response_model=self.schema, response_model_exclude_unset=self.exclude_unset)
        self._add(method, f"/{{{self._ref}}}{suffix}", name, summary, params, found, **route)

    def add_list(self, call: Lister, allowed: Collection[str], summary: str) -> None:
        """``GET /``: one page of objects, in the list query syntax of ``services/listing.py``."""
        page: Any = Page[self.schema]  # type: ignore[name-defined]

        async def run(scope: Scope, q: ListQuery) -> Any:
            rows, total = await call(scope, q)
            return page(items=[self.schema.model_validate(r) for r in rows], total=total)

        params = [_param("scope", ScopeDep), _param("q", Annotated[ListQuery, list_query(allowed)])]
        self._add(
            "GET",
            "",
            f"list_{self.noun}s",
            summary,
            params,
            run,
            response_model=page,
            response_model_exclude_unset=self.exclude_unset,
        )

    def add_create(self, body: type[B], call: Callable[[Scope, B], Awaitable[Row]], summary: str) -> None:
        """``POST /``: create the object the validated ``body`` describes; 201 with the new object."""

        async def run(scope: Scope, body: B) -> S:
            return self.schema.model_validate(await call(scope, body))

        params = [_param("scope", ScopeDep), _param("body", body)]
        self._add(
            "POST",
            "",
            f"create_{self.noun}",
            summary,
            params,
            run,
            status_code=status.HTTP_201_CREATED,
            response_model=self.schema,
            response_model_exclude_unset=self.exclude_unset,
        )

    def add_get(self, call: Call, summary: str) -> None:
        """``GET /{ref}``: the object."""

        async def run(scope: Scope, key: Any) -> S:
            return self.schema.model_validate(await call(scope, key))

        self._on_object("GET", "", f"get_{self.noun}", summary, run)

    def add_patch(self, body: type[B], call: Patch[B], summary: str) -> None:
        """``PATCH /{ref}``: apply the validated ``body`` through the service; answer the changed object."""

        async def run(scope: Scope, key: Any, body: B) -> S:
            return self.schema.model_validate(await call(scope, key, body))

        self._on_object("PATCH", "", f"update_{self.noun}", summary, run, body)

    def add_action(self, action: str, call: Call, summary: str, **route: Any) -> None:
        """``POST /{ref}/{action}``: ask the service to act on the object; answer the object as it is now."""

        async def run(scope: Scope, key: Any) -> S:
            return self.schema.model_validate(await call(scope, key))

        self._on_object("POST", f"/{action}", f"{action}_{self.noun}", summary, run, **route)

    def add_action_with(self, action: str, body: type[B], call: Patch[B], summary: str) -> None:
        """``POST /{ref}/{action}`` with a validated ``body`` telling the service how to act."""

        async def run(scope: Scope, key: Any, body: B) -> S:
            return self.schema.model_validate(await call(scope, key, body))

        self._on_object("POST", f"/{action}", f"{action}_{self.noun}", summary, run, body)

    def add_delete(self, call: Delete, summary: str) -> None:
        """``DELETE /{ref}``: 204 and no body."""

        async def run(scope: Scope, key: Any) -> Response:
            await call(scope, key)
            return Response(status_code=status.HTTP_204_NO_CONTENT)

        self._on_object(
            "DELETE",
            "",
            f"delete_{self.noun}",
            summary,
            run,
            status_code=status.HTTP_204_NO_CONTENT,
            response_class=Response,
        )
