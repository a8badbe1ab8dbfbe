"""One error code, one HTTP status: a client branches on ``code``, so the same code must never come back as a
403 from one path and a 409 from another (``desktop_blocked`` once did).  Every ``raise SomeError(..., code=...)``
under ``src/`` is read and the statuses each code is raised with are compared."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from deckard.model import errors

SRC = Path(__file__).resolve().parents[2] / "src" / "deckard"
STATUS = {
    name: cls.status
    for name, cls in vars(errors).items()
    if isinstance(cls, type) and issubclass(cls, errors.DeckardError)
}


def _raised_codes() -> dict[str, set[tuple[int, str]]]:
    seen: dict[str, set[tuple[int, str]]] = defaultdict(set)
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            call = node.exc if isinstance(node, ast.Raise) else None
            if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or call.func.id not in STATUS:
                continue
            for kw in call.keywords:
                if kw.arg == "code" and isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, str):
                    where = f"{path.relative_to(SRC)}:{node.lineno}"
                    seen[kw.value.value].add((STATUS[call.func.id], where))
    return seen


def test_every_error_code_is_raised_with_one_status_only() -> None:
    codes = _raised_codes()
    assert {s for s, _ in codes["desktop_blocked"]} == {403}  # the broker's (QVD's) status, in the API too
    mixed = {code: sorted(places) for code, places in codes.items() if len({s for s, _ in places}) > 1}
    assert not mixed
