"""TOTP codes and recovery codes (auth/totp.py): the window, refusal by step, and what recovery codes look like."""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import re
from urllib.parse import parse_qs, unquote, urlsplit

import pyotp
import pytest

from deckard.auth import totp

T = 1_800_000_015.0  # the middle of a 30-second step
STEP = 60_000_000  # T // 30
FIXED_SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"


def _code(secret: str, step: int) -> str:
    return pyotp.TOTP(secret).generate_otp(step)


def test_a_secret_is_160_random_bits_in_base32() -> None:
    secret = totp.new_secret()
    assert re.fullmatch(r"[A-Z2-7]{32}", secret)
    assert len(base64.b32decode(secret)) == 20
    assert totp.new_secret() != secret


def test_the_uri_names_issuer_account_and_secret_for_an_authenticator_app() -> None:
    secret = totp.new_secret()
    uri = totp.provisioning_uri(secret, "alice@default", "Deckard Farm")
    parts = urlsplit(uri)
    assert (parts.scheme, parts.netloc) == ("otpauth", "totp")
    assert unquote(parts.path) == "/Deckard Farm:alice@default"
    query = parse_qs(parts.query)
    assert query["secret"] == [secret] and query["issuer"] == ["Deckard Farm"]
    app = pyotp.parse_uri(uri)  # an app reading the URI makes the codes we expect
    assert isinstance(app, pyotp.TOTP) and app.now() == pyotp.TOTP(secret).now()


@pytest.mark.parametrize("offset", [-1, 0, 1])
def test_codes_of_the_current_step_and_its_neighbours_are_accepted_with_their_step(offset: int) -> None:
    secret = totp.new_secret()
    assert totp.step_at(T) == STEP
    assert totp.verify_code(secret, _code(secret, STEP + offset), last_step=0, now=T) == STEP + offset


@pytest.mark.parametrize("offset", [-3, -2, 2, 3])
def test_codes_outside_the_window_are_refused(offset: int) -> None:
    secret = FIXED_SECRET  # fixed, so that no code outside the window happens to equal one inside it
    code = _code(secret, STEP + offset)
    assert code not in {_code(secret, STEP + i) for i in (-1, 0, 1)}
    assert totp.verify_code(secret, code, last_step=0, now=T) is None
    assert totp.verify_code(secret, code, last_step=0, now=T, window=abs(offset)) == STEP + offset


def test_window_zero_accepts_the_current_step_only() -> None:
    secret = totp.new_secret()
    assert totp.verify_code(secret, _code(secret, STEP), last_step=0, now=T, window=0) == STEP
    assert totp.verify_code(secret, _code(secret, STEP + 1), last_step=0, now=T, window=0) is None


def test_the_default_clock_is_the_wall_clock() -> None:
    secret = totp.new_secret()
    assert totp.verify_code(secret, pyotp.TOTP(secret).now(), last_step=0) is not None


def test_a_used_step_and_every_older_one_are_refused() -> None:
    secret = totp.new_secret()
    code = _code(secret, STEP)
    assert totp.verify_code(secret, code, last_step=STEP - 1, now=T) == STEP
    assert totp.verify_code(secret, code, last_step=STEP, now=T) is None  # replay of the same code
    assert totp.verify_code(secret, code, last_step=STEP + 1, now=T) is None  # older, after a newer one was used
    assert totp.verify_code(secret, code, last_step=-1, now=T) == STEP  # still a valid code: it is a replay
    assert totp.verify_code(secret, _code(secret, STEP + 1), last_step=STEP, now=T) == STEP + 1


@pytest.mark.parametrize("shape", ["{} {}", " {}{} ", "{}\t{}"])
def test_spaces_inside_a_code_are_ignored(shape: str) -> None:
    secret = totp.new_secret()
    code = _code(secret, STEP)
    assert totp.verify_code(secret, shape.format(code[:3], code[3:]), last_step=0, now=T) == STEP


@pytest.mark.parametrize("junk", ["", "12345", "1234567", "abcdef", "12345a", "١٢٣٤٥٦", "-12345"])
def test_anything_but_six_ascii_digits_is_refused(junk: str) -> None:
    assert totp.verify_code(totp.new_secret(), junk, last_step=0, now=T) is None
    assert not totp.looks_like_totp_code(junk)


def test_every_step_of_the_window_is_compared_even_after_a_match(monkeypatch: pytest.MonkeyPatch) -> None:
    """No early exit: the time taken does not tell which step matched."""
    compared: list[bytes] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append(a)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    secret = totp.new_secret()
    assert totp.verify_code(secret, _code(secret, STEP - 1), last_step=0, now=T, window=2) == STEP - 1
    assert len(compared) == 5


def test_recovery_codes_are_groups_of_four_from_an_unambiguous_alphabet() -> None:
    codes = totp.new_recovery_codes()
    assert len(codes) == 10 and len(totp.new_recovery_codes(3)) == 3
    pattern = re.compile(r"[0-9a-hjkmnp-tv-z]{4}-[0-9a-hjkmnp-tv-z]{4}-[0-9a-hjkmnp-tv-z]{4}")
    assert all(pattern.fullmatch(c) for c in codes), codes
    assert not set("ilou") & set(totp.RECOVERY_ALPHABET)


def test_a_recovery_code_carries_at_least_60_random_bits() -> None:
    alphabet = set(totp.RECOVERY_ALPHABET)
    assert len(alphabet) == len(totp.RECOVERY_ALPHABET) == 32
    assert totp.RECOVERY_GROUPS * totp.RECOVERY_GROUP_LEN * math.log2(len(alphabet)) >= 60
    many = totp.new_recovery_codes(2000)
    assert len(set(many)) == 2000
    used = set("".join(many).replace("-", ""))
    assert used == alphabet  # 24,000 draws: every character turns up, none outside the alphabet


@pytest.mark.parametrize(
    "typed", ["7hq2-m0xe-k4dp", "7HQ2-M0XE-K4DP", "7hq2m0xek4dp", " 7hq2 m0xe k4dp ", "7hq2-mOxe-k4dp"]
)
def test_a_recovery_code_hashes_the_same_however_it_is_typed(typed: str) -> None:
    assert totp.hash_recovery_code(typed) == hashlib.sha256(b"7hq2m0xek4dp").hexdigest()


def test_letters_read_as_digits_are_normalised_and_other_codes_hash_apart() -> None:
    assert totp.normalise_recovery_code("1ILo-0000-0000") == "111000000000"
    assert totp.hash_recovery_code("7hq2-m0xe-k4dp") != totp.hash_recovery_code("7hq2-m0xe-k4dq")
