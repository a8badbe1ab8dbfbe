"""Local passwords: argon2id, and the same work for a name that does not exist as for a wrong password."""

from __future__ import annotations

import pytest

from deckard.auth import local


def test_a_password_matches_its_hash_only() -> None:
    h = local.hash_password("correct horse")
    assert local.verify_password(h, "correct horse")
    assert not local.verify_password(h, "correct horse ")
    assert not local.verify_password("not-a-hash", "correct horse")


@pytest.mark.parametrize("missing", [None, ""])
def test_no_hash_runs_argon2_against_a_decoy_and_fails(missing: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unknown login must not answer faster than a wrong password: it pays one argon2 verification too."""
    calls: list[str] = []
    real = local._hasher

    class Counting:
        hash = real.hash

        def verify(self, hash_: str, password: str) -> bool:
            calls.append(hash_)
            return real.verify(hash_, password)

    monkeypatch.setattr(local, "_hasher", Counting())
    assert not local.verify_password(missing, "anything")
    assert len(calls) == 1 and calls[0].startswith("$argon2id$")
