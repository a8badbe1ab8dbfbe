"""Parsing of the list query syntax shared by every list route and the CLI's ``--filter``."""

from __future__ import annotations

import pytest

from deckard.model.errors import BadInput
from deckard.services.listing import Filter, parse_list_query

ALLOWED = ["id", "name", "state", "created_at"]


def test_filters_default_to_equality_and_keep_their_operator() -> None:
    q = parse_list_query([("name", "web1"), ("id__gte", "3"), ("state__in", "running,starting")], ALLOWED)
    assert q.filters == [
        Filter("name", "eq", "web1"),
        Filter("id", "gte", "3"),
        Filter("state", "in", "running,starting"),
    ]
    assert q.named_fields == {"name", "id", "state"}


def test_sort_page_per_page_and_fields() -> None:
    q = parse_list_query(
        [("sort", "-created_at, name"), ("page", "3"), ("per_page", "20"), ("fields", "id,name")], ALLOWED
    )
    assert q.sort == [("created_at", True), ("name", False)]
    assert (q.page, q.per_page, q.fields) == (3, 20, ["id", "name"])
    assert q.named_fields == {"created_at", "name"}


def test_defaults_when_nothing_is_asked() -> None:
    q = parse_list_query([], ALLOWED)
    assert (q.filters, q.sort, q.page, q.per_page, q.fields) == ([], [], 1, 50, None)


@pytest.mark.parametrize(
    "pairs,code",
    [
        ([("colour", "red")], "bad_filter"),
        ([("name__like", "x")], "bad_filter"),
        ([("sort", "colour")], "bad_sort"),
        ([("fields", "id,colour")], "bad_fields"),
        ([("page", "0")], "bad_query"),
        ([("per_page", "5000")], "bad_query"),
        ([("page", "two")], "bad_query"),
    ],
)
def test_unknown_fields_operators_and_bad_numbers_are_refused(pairs: list[tuple[str, str]], code: str) -> None:
    with pytest.raises(BadInput) as e:
        parse_list_query(pairs, ALLOWED)
    assert e.value.code == code and e.value.status == 422
