"""The portal's second factor and personal tokens in Debian's Chromium, driven by Playwright.

No LXC farm: the identity pages need no running desktop, so the API is served in-process over SQLite and TLS
(``ApiThread`` of ``test_wat.py``), with a desktop row for the list to show.  Codes come from pyotp, as an
authenticator app makes them.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyotp
import pytest
from test_wat import Api, ApiThread

from deckard.db.engine import Database
from deckard.testing import goto

FAILSHOTS = Path("/tmp/deckard-portal-identity")
PASSWORD = "identity-pw1"
NETWORK = "127.77.0.0/24"
secrets_of: dict[str, str] = {}  # login → TOTP secret, written by _prepare in the server's thread

# a QR code is drawn when the canvas has a size and a good share of dark modules
QR_DRAWN = """() => {
  const c = document.querySelector('#sf-qr');
  if (!c || c.dataset.drawn !== '1' || c.width < 100) return false;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let dark = 0;
  for (let i = 0; i < d.length; i += 4) if (d[i] < 128) dark++;
  return dark > d.length / 4 / 5;
}"""


async def _prepare(db: Database) -> None:
    from deckard.services import config, desktops, second_factor, users
    from deckard.services.context import SYSTEM

    await config.set_config(db, SYSTEM, "auth.failure_floor_ms", 0)
    for login in ("carol", "dave"):
        await users.create_user(db, SYSTEM, login, PASSWORD)
        await desktops.create_desktop(db, SYSTEM, f"{login}-desk", login, network=NETWORK)
    carol = await users.find_user_id(db, SYSTEM, "carol")
    enrol = await second_factor.start_enrolment(db, "user", carol, "carol@default", "Deckard")
    # the previous step's code: the current one is left for the login
    await second_factor.confirm_enrolment(db, "user", carol, pyotp.TOTP(enrol["secret"]).at(time.time() - 30))
    secrets_of["carol"] = enrol["secret"]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    with ApiThread(tmp_path_factory.mktemp("portal-identity"), prepare=_prepare) as a:
        yield a


@pytest.fixture
def page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    ctx = browser.new_context(ignore_https_errors=True, viewport={"width": 1100, "height": 900})
    pg = ctx.new_page()
    pg.set_default_timeout(30_000)  # the suite boots VMs beside it: a busy machine
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))  # an exception in the page's script (a refused answer is not)

    def on_console(message: Any) -> None:
        # the QR code is drawn without anything the Content-Security-Policy refuses (inline style, eval, fetches)
        if "Content Security Policy" in message.text or "Refused to" in message.text:
            errors.append(message.text)

    pg.on("console", on_console)
    failed = request.session.testsfailed
    try:
        yield pg
        if request.session.testsfailed > failed:  # the call's report is in before the teardown runs
            FAILSHOTS.mkdir(parents=True, exist_ok=True)
            pg.screenshot(path=str(FAILSHOTS / f"{request.node.name}.png"), full_page=True)
        assert not errors, f"the page's script failed or broke the CSP: {errors}"
    finally:
        ctx.close()


def _password_step(page: Any, api: Api, login: str) -> None:
    goto(page, api.url + "/")
    page.get_by_label("User name").fill(login)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()


def test_a_code_completes_the_login_and_the_account_panel_enrols_an_app_and_makes_a_token(page: Any, api: Api) -> None:
    _password_step(page, api, "carol")
    page.get_by_text("Enter the 6-digit code from your authenticator app (or a recovery code).").wait_for()
    totp = pyotp.TOTP(secrets_of["carol"])
    now = time.time()
    valid = {totp.at(now + d) for d in (-30, 0, 30)}
    page.locator("#code").fill(next(c for c in ("000000", "111111", "222222") if c not in valid))
    page.get_by_role("button", name="Verify").click()
    page.get_by_role("alert").filter(has_text="The code is wrong").wait_for()
    page.locator("#code").fill(totp.now())
    page.get_by_role("button", name="Verify").click()
    page.get_by_role("button", name="Connect to carol-desk").wait_for()
    assert page.locator("#who").text_content() == "carol"
    page.get_by_role("button", name="Log out").click()

    # dave has no second factor yet: he sets one up in the Account panel
    _password_step(page, api, "dave")
    page.get_by_role("button", name="Connect to dave-desk").wait_for()
    page.get_by_role("button", name="Account").click()
    page.get_by_text("Off: your password alone logs you in.").wait_for()
    page.get_by_role("button", name="Set up authenticator app").click()
    page.wait_for_function(QR_DRAWN)
    secret = re.sub(r"\s", "", page.locator("#sf-secret").text_content())
    page.locator("#sf-code").fill(pyotp.TOTP(secret).now())
    page.get_by_role("button", name="Confirm", exact=True).click()
    page.locator("#account-codes li").nth(9).wait_for()
    assert page.locator("#account-codes li").count() == 10
    page.get_by_role("button", name="I saved them").click()
    page.get_by_text("10 recovery codes left").wait_for()
    assert page.locator("#account-codes li").count() == 0, "the codes are shown once"

    page.get_by_label("Name", exact=True).fill("laptop")
    page.get_by_label("Lifetime (days)").fill("7")
    page.get_by_role("button", name="Create token").click()
    page.get_by_role("button", name="Revoke token laptop").wait_for()
    shown = page.locator("#token-secret").text_content()
    assert shown.startswith("dku_") and len(shown) > 30
    assert page.locator("#token-qvd").text_content() == f"--token {shown}"
    row = page.locator("#tokens tbody tr").filter(has_text="laptop")
    assert "Active" in row.text_content() and "Never" in row.text_content()
    page.get_by_role("button", name="Done").click()
    assert shown not in page.content(), "the secret is gone from the page once dismissed"
