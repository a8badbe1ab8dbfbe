"""Local passwords: argon2id, and the same work for a name that does not exist as for a wrong password."""

from __future__ import annotations

import subprocess
import sys
import threading
from typing import Any

import argon2
import pytest

from deckard.auth import local
from deckard.auth.chain import Credentials, Verdict


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The hashes argon2 checked a password against (in kept memory or, all of it in use, argon2's own)."""
    calls: list[str] = []
    real, real_in = local._hasher, local._verify_in

    class Counting:
        hash = real.hash

        def verify(self, hash_: str, password: str) -> bool:
            calls.append(hash_)
            return real.verify(hash_, password)

    def counted_in(arena: Any, hash_: str, password: str) -> bool:
        calls.append(hash_)
        return real_in(arena, hash_, password)

    monkeypatch.setattr(local, "_hasher", Counting())
    monkeypatch.setattr(local, "_verify_in", counted_in)
    return calls


def test_a_password_matches_its_hash_only() -> None:
    h = local.hash_password("correct horse")
    assert local.verify_password(h, "correct horse")
    assert not local.verify_password(h, "correct horse ")
    assert not local.verify_password("not-a-hash", "correct horse")


def test_checks_at_once_in_kept_memory_or_not_each_get_their_own_answer() -> None:
    """More checks at once than arenas kept: the others run in argon2's own memory; none sees another's."""
    hashes = {pw: local.hash_password(pw) for pw in ("alpha-1", "bravo-2", "charlie-3")}
    answers: list[tuple[bool, bool]] = []

    def check(pw: str, tried: str) -> None:
        answers.append((local.verify_password(hashes[pw], tried), pw == tried))

    threads = [threading.Thread(target=check, args=(pw, tried)) for pw in hashes for tried in hashes]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(answers) == 9 and all(got == want for got, want in answers)


def test_hashes_of_other_costs_and_types_verify_too() -> None:
    """A hash made with more memory than is kept (argon2's own malloc), fewer lanes or another argon2 type."""
    for hasher in (
        argon2.PasswordHasher(time_cost=1, memory_cost=65536, parallelism=2),
        argon2.PasswordHasher(time_cost=3, memory_cost=8192, parallelism=4),
        argon2.PasswordHasher(memory_cost=8192, type=argon2.Type.I),
    ):
        h = hasher.hash("s3cret")
        assert local.verify_password(h, "s3cret") and not local.verify_password(h, "s3cret!"), h
    bad_salt = "$argon2id$v=19$m=19456,t=2,p=1$!!!!$" + "A" * 43
    assert not local.verify_password(bad_salt, "s3cret")


def test_a_servers_kept_memory_is_not_faulted_in_at_each_login() -> None:
    """In the broker's process big allocations are mapped afresh (``bound_the_heap``): argon2's 19 MiB faulted in
    4,865 zeroed pages at every login.  After ``warm`` a check takes its memory from the kept arena."""
    script = (
        "import resource\n"
        "from deckard.broker.server import bound_the_heap\n"
        "from deckard.auth import local\n"
        "assert bound_the_heap()\n"
        "h = local.hash_password('pw')\n"
        "local.warm()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "assert local.verify_password(h, 'pw') and not local.verify_password(h, 'px')\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60)
    assert int(out.stdout) < 500, out.stdout  # two checks; 9,730 faults without the arena


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
