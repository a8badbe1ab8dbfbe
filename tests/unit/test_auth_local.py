"""Local passwords: argon2id, and the same work for a name that does not exist as for a wrong password."""

from __future__ import annotations

import pytest

from deckard.auth import local
from deckard.auth.chain import Credentials, Verdict


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = local._hasher

    class Counting:
        hash = real.hash

        def verify(self, hash_: str, password: str) -> bool:
            calls.append(hash_)
            return real.verify(hash_, password)

    monkeypatch.setattr(local, "_hasher", Counting())
    return calls


def test_a_password_matches_its_hash_only() -> None:
    h = local.hash_password("correct horse")
    assert local.verify_password(h, "correct horse")
    assert not local.verify_password(h, "correct horse ")
    assert not local.verify_password("not-a-hash", "correct horse")


@pytest.mark.parametrize("missing", [None, ""])
def test_no_hash_runs_argon2_against_a_decoy_and_fails(missing: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unknown login must not answer faster than a wrong password: it pays one argon2 verification too."""
    calls = _counting(monkeypatch)
    assert not local.verify_password(missing, "anything")
    assert len(calls) == 1 and calls[0].startswith("$argon2id$")


async def test_a_password_confirmed_a_moment_ago_skips_argon2_and_a_wrong_one_never_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _counting(monkeypatch)
    plugin = local.LocalAuthenticator.from_config({"auth.local.remember_s": 300})
    h = local.hash_password("correct horse")
    creds = Credentials("ann", "", "correct horse", password_hash=h)
    assert (await plugin.authenticate(creds)).verdict == Verdict.ACCEPT and len(calls) == 1
    assert (await plugin.authenticate(creds)).verdict == Verdict.ACCEPT and len(calls) == 1  # remembered
    wrong = Credentials("ann", "", "correct horse!", password_hash=h)
    assert (await plugin.authenticate(wrong)).verdict == Verdict.REJECT and len(calls) == 2  # argon2, as ever
    changed = Credentials("ann", "", "correct horse", password_hash=local.hash_password("correct horse"))
    assert (await plugin.authenticate(changed)).verdict == Verdict.ACCEPT and len(calls) == 3  # a new hash: checked
    assert not any(b"correct horse" in mac for mac, _ in plugin.recent._entries.values())


async def test_remembering_ends_after_its_time_and_is_off_at_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counting(monkeypatch)
    h = local.hash_password("pw")
    creds = Credentials("ann", "", "pw", password_hash=h)
    off = local.LocalAuthenticator.from_config({"auth.local.remember_s": 0})
    for _ in range(2):
        assert (await off.authenticate(creds)).verdict == Verdict.ACCEPT
    assert len(calls) == 2
    now = [1000.0]
    monkeypatch.setattr(local.time, "monotonic", lambda: now[0])
    on = local.LocalAuthenticator.from_config({"auth.local.remember_s": 60})
    await on.authenticate(creds)
    now[0] += 59
    await on.authenticate(creds)
    assert len(calls) == 3
    now[0] += 2
    await on.authenticate(creds)
    assert len(calls) == 4


def test_remembered_logins_are_bounded() -> None:
    recent = local.RecentLogins(60, size=3)
    for i in range(5):
        recent.remember(f"hash{i}", "pw")
    assert list(recent._entries) == ["hash2", "hash3", "hash4"]
    assert recent.confirms("hash4", "pw") and not recent.confirms("hash0", "pw")
