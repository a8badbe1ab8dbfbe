"""Strict numbers from clients (``model/ids.py``), bounded config keys (``model/config_keys.py``) and list
filters that name their field (``services/listing.py``): pure functions, no database."""

from __future__ import annotations

import math
from typing import Any

import pytest
import sqlalchemy as sa

from deckard.model.config_keys import KEYS, parse_value
from deckard.model.errors import BadInput
from deckard.model.ids import ID_MAX, INT64_MAX, looks_numeric, parse_id, parse_int
from deckard.services.listing import Filter, apply_query, parse_list_query

FULLWIDTH_ONE = "\uff11"
SUPERSCRIPT_TWO = "\u00b2"


@pytest.mark.parametrize("raw", ["1", "42", str(ID_MAX)])
def test_ascii_ids_in_range_are_taken(raw: str) -> None:
    assert parse_id(raw) == int(raw)


@pytest.mark.parametrize(
    "raw", ["0", "-1", str(ID_MAX + 1), "9" * 25, FULLWIDTH_ONE, SUPERSCRIPT_TWO, "1_000", " 7", "+7", "", "7a"]
)
def test_anything_else_is_not_an_id_and_the_error_names_the_field(raw: str) -> None:
    with pytest.raises(BadInput) as e:
        parse_id(raw, "desktop")
    assert e.value.status == 422 and "desktop" in e.value.message and e.value.details["field"] == "desktop"


def test_integers_are_int64_and_signed() -> None:
    assert parse_int(str(INT64_MAX), "n") == INT64_MAX and parse_int("-5", "n") == -5
    with pytest.raises(BadInput):
        parse_int(str(INT64_MAX + 1), "n")


def test_what_isdigit_takes_for_an_id_is_what_must_be_checked() -> None:
    assert looks_numeric(FULLWIDTH_ONE) and looks_numeric(SUPERSCRIPT_TWO) and looks_numeric("12")
    assert not looks_numeric("web1") and not looks_numeric("-1")


def test_every_numeric_config_key_has_both_bounds() -> None:
    """``ui.page_size`` had no maximum; a key added without one fails here."""
    for key in KEYS.values():
        if key.type in (int, float):
            assert key.minimum is not None and key.maximum is not None, key.name
            assert key.minimum <= key.default <= key.maximum, key.name


@pytest.mark.parametrize(
    "raw", [1001, 0, -1, 10**30, 1e300, math.inf, math.nan, 50.5, "50.5", FULLWIDTH_ONE + "0", "1_0", True, None, [50]]
)
def test_config_values_out_of_type_or_range_are_refused_naming_key_and_range(raw: Any) -> None:
    with pytest.raises(BadInput) as e:
        parse_value(KEYS["ui.page_size"], raw)
    assert e.value.code == "bad_config_value"
    assert "ui.page_size" in e.value.message and "between 1 and 1000" in e.value.message
    assert e.value.details == {"key": "ui.page_size", "minimum": 1, "maximum": 1000}


@pytest.mark.parametrize("raw,value", [(1000, 1000), ("1", 1), (" 20 ", 20), (30.0, 30)])
def test_config_values_in_range_are_taken(raw: Any, value: int) -> None:
    assert parse_value(KEYS["ui.page_size"], raw) == value


T = sa.table("things", sa.column("id", sa.Integer), sa.column("size", sa.BigInteger), sa.column("node", sa.String))
COLUMNS = {"id": T.c.id, "size": T.c.size, "node": T.c.node}


def _where(field: str, op: str, value: str) -> str:
    q = parse_list_query([(field if op == "eq" else f"{field}__{op}", value)], COLUMNS)
    page, _count = apply_query(sa.select(T), q, COLUMNS, T.c.id)
    return str(page)


@pytest.mark.parametrize(
    "field,op,value",
    [
        ("id", "eq", "9" * 25),
        ("id", "eq", str(2**31)),  # ids are INTEGER: PostgreSQL cannot even bind more
        ("id", "in", "1," + FULLWIDTH_ONE),
        ("size", "gt", str(2**63)),
        ("node", "null", "maybe"),
    ],
)
def test_filter_values_are_strict_and_errors_name_the_filter_never_a_bind_parameter(
    field: str, op: str, value: str
) -> None:
    with pytest.raises(BadInput) as e:
        _where(field, op, value)
    assert e.value.code == "bad_filter" and field in e.value.message
    assert "param_" not in e.value.message and "things" not in e.value.message


def test_a_bigint_filter_takes_64_bits() -> None:
    assert "size >" in _where("size", "gt", str(2**62))
    assert Filter("size", "gt", "1") == parse_list_query([("size__gt", "1")], COLUMNS).filters[0]
