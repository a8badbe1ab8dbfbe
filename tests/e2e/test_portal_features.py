"""The portal's viewer features in a real browser: clipboard both ways, resize, full screen, disconnect, reset,
and "No sound" for a desktop without an audio server.

A real farm (``deckard up``, one LXC desktop), the portal served by the API, the broker's WebSocket and Debian's
Chromium driven by Playwright, as in ``test_portal.py``.  One user stays logged in for the whole module; each
test reconnects when it needs a live desktop.  Two tests replay a quick Disconnect/Connect on a slow network
(a WebSocket close or a ticket held back by Playwright): a stale connection must not disturb the current one.

The image has no ``xclip``/``xsel``: the desktop's X clipboard is read and owned by a small ``python3`` script
that calls ``libX11`` through ``ctypes`` (both are in the image), run as the user on display ``:0``.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from deckard.runtime.paths import FarmPaths
from deckard.testing import FarmProcess, goto

pytestmark = pytest.mark.e2e
SHARED_FARM = True  # tests/e2e/conftest.py: users and desktops of its own names, no farm-wide change kept

FAILSHOTS = Path("/tmp/deckard-portal-features")
USER, PASSWORD, DESK = "fiona", "features-pw1", "fiona-desk"
CANVAS = "#screen-canvas canvas"

# Owns (``set TEXT``) or reads (``get``) the CLIPBOARD selection of $DISPLAY with libX11 through ctypes.
XCLIP = r"""
import ctypes, sys, time
from ctypes import POINTER, Structure, Union, byref, c_char_p, c_int, c_long, c_ubyte, c_ulong, c_void_p
X = ctypes.CDLL("libX11.so.6")
X.XOpenDisplay.restype = c_void_p
X.XOpenDisplay.argtypes = [c_char_p]
for name, res, args in [
    ("XDefaultRootWindow", c_ulong, [c_void_p]),
    ("XCreateSimpleWindow", c_ulong, [c_void_p, c_ulong, c_int, c_int, ctypes.c_uint, ctypes.c_uint,
                                      ctypes.c_uint, c_ulong, c_ulong]),
    ("XInternAtom", c_ulong, [c_void_p, c_char_p, c_int]),
    ("XSetSelectionOwner", c_int, [c_void_p, c_ulong, c_ulong, c_ulong]),
    ("XGetSelectionOwner", c_ulong, [c_void_p, c_ulong]),
    ("XConvertSelection", c_int, [c_void_p, c_ulong, c_ulong, c_ulong, c_ulong, c_ulong]),
    ("XPending", c_int, [c_void_p]),
    ("XNextEvent", c_int, [c_void_p, c_void_p]),
    ("XSendEvent", c_int, [c_void_p, c_ulong, c_int, c_long, c_void_p]),
    ("XChangeProperty", c_int, [c_void_p, c_ulong, c_ulong, c_ulong, c_int, c_int, c_void_p, c_int]),
    ("XGetWindowProperty", c_int, [c_void_p, c_ulong, c_ulong, c_long, c_long, c_int, c_ulong, POINTER(c_ulong),
                                   POINTER(c_int), POINTER(c_ulong), POINTER(c_ulong), POINTER(POINTER(c_ubyte))]),
    ("XFlush", c_int, [c_void_p]),
]:
    getattr(X, name).restype, getattr(X, name).argtypes = res, args

class Request(Structure):
    _fields_ = [("type", c_int), ("serial", c_ulong), ("send_event", c_int), ("display", c_void_p),
                ("owner", c_ulong), ("requestor", c_ulong), ("selection", c_ulong), ("target", c_ulong),
                ("property", c_ulong), ("time", c_ulong)]

class Notify(Structure):
    _fields_ = [("type", c_int), ("serial", c_ulong), ("send_event", c_int), ("display", c_void_p),
                ("requestor", c_ulong), ("selection", c_ulong), ("target", c_ulong), ("property", c_ulong),
                ("time", c_ulong)]

class Event(Union):
    _fields_ = [("type", c_int), ("req", Request), ("sel", Notify), ("pad", c_long * 24)]

SELECTION_CLEAR, SELECTION_REQUEST, SELECTION_NOTIFY = 29, 30, 31
dpy = X.XOpenDisplay(None)
if not dpy:
    sys.exit("cannot open the display")
atom = lambda name: X.XInternAtom(dpy, name.encode(), 0)
CLIPBOARD, UTF8, TARGETS, PROP = atom("CLIPBOARD"), atom("UTF8_STRING"), atom("TARGETS"), atom("DECKARD_CLIP")
STRING, ATOM = 31, 4
win = X.XCreateSimpleWindow(dpy, X.XDefaultRootWindow(dpy), 0, 0, 1, 1, 0, 0, 0)
ev = Event()

def next_event(deadline):
    while time.monotonic() < deadline:
        if X.XPending(dpy):
            X.XNextEvent(dpy, byref(ev))
            return True
        time.sleep(0.01)
    return False

if sys.argv[1] == "get":
    X.XConvertSelection(dpy, CLIPBOARD, UTF8, PROP, win, 0)
    X.XFlush(dpy)
    deadline = time.monotonic() + 5
    while next_event(deadline):
        if ev.type == SELECTION_NOTIFY:
            if not ev.sel.property:
                sys.exit("the clipboard owner refused the conversion")
            kind, fmt, n, after = c_ulong(), c_int(), c_ulong(), c_ulong()
            data = POINTER(c_ubyte)()
            X.XGetWindowProperty(dpy, win, PROP, 0, 1 << 20, 1, 0, byref(kind), byref(fmt), byref(n),
                                 byref(after), byref(data))
            sys.stdout.write(ctypes.string_at(data, n.value).decode("utf-8", "replace"))
            sys.exit(0)
    sys.exit("no answer from the clipboard owner")

text = sys.argv[2].encode()
X.XSetSelectionOwner(dpy, CLIPBOARD, win, 0)
if X.XGetSelectionOwner(dpy, CLIPBOARD) != win:
    sys.exit("could not own the clipboard")
X.XFlush(dpy)
print("owner", flush=True)
deadline = time.monotonic() + 30
while next_event(deadline):
    if ev.type == SELECTION_CLEAR:
        break
    if ev.type != SELECTION_REQUEST:
        continue
    r = ev.req
    prop = r.property or r.target
    if r.target == TARGETS:
        atoms = (c_ulong * 3)(TARGETS, UTF8, STRING)
        X.XChangeProperty(dpy, r.requestor, prop, ATOM, 32, 0, atoms, 3)
    elif r.target in (UTF8, STRING):
        X.XChangeProperty(dpy, r.requestor, prop, r.target, 8, 0, text, len(text))
    else:
        prop = 0
    answer = Event()
    answer.sel.type, answer.sel.requestor, answer.sel.selection = SELECTION_NOTIFY, r.requestor, r.selection
    answer.sel.target, answer.sel.property, answer.sel.time = r.target, prop, r.time
    X.XSendEvent(dpy, r.requestor, 0, 0, byref(answer))
    X.XFlush(dpy)
"""


@dataclass
class Portal:
    farm: FarmProcess
    page: Any
    desktop_id: int

    def sh(self, command: str, *, user: bool = True, check: bool = True) -> str:
        """A shell command inside the desktop, as the user on the display (or as root)."""
        out = self.farm.attach(self.desktop_id, command, user=USER if user else None)
        if check and out.returncode != 0:
            raise AssertionError(f"`{command}` failed in the desktop ({out.returncode}): {out.stdout}{out.stderr}")
        return out.stdout

    def row(self) -> dict[str, Any]:
        rows: Any = self.farm.json("desktop", "list")
        return next(d for d in rows if d["name"] == DESK)


def _wait(
    probe: Callable[[], Any], timeout: float, what: str, until: Callable[[Any], Any] = bool, interval: float = 0.2
) -> Any:
    """Probe until ``until(value)`` holds and return the value; the last value is in the error otherwise."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = probe()
        if until(value):
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {value!r})")


def _login(browser: Any, farm: FarmProcess) -> tuple[Any, Any]:
    """A new browser context with the user logged in to the portal, their desktop listed."""
    ctx = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 800})
    ctx.set_default_timeout(15_000)
    page = ctx.new_page()
    goto(page, f"https://127.0.0.1:{farm.api_port}/")
    page.get_by_label("User name").fill(USER)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.get_by_role("button", name=f"Connect to {DESK}").wait_for()
    return ctx, page


def _close_viewer(p: Portal) -> None:
    """Back to the list, the user's session over."""
    if p.page.locator("#viewer").is_visible():
        p.page.get_by_role("button", name="Disconnect").click()
    _wait(p.row, 15, "user_state disconnected", lambda r: r["user_state"] != "connected", 0.5)


@pytest.fixture(scope="module")
def portal(farm: FarmProcess, browser: Any) -> Iterator[Portal]:
    farm.deckard("user", "add", USER, "--password", PASSWORD)
    farm.deckard("desktop", "add", DESK, "--user", USER)
    # keep the writable layer across starts, so that only "reset my desktop" can discard it
    osf: Any = farm.json("osf", "list")
    farm.deckard("osf", "update", str(osf[0]["id"]), "--keep-overlay")
    try:
        ctx, page = _login(browser, farm)
        rows: Any = farm.json("desktop", "list")
        try:
            yield Portal(farm, page, int(next(d for d in rows if d["name"] == DESK)["id"]))
        finally:
            ctx.close()
    finally:  # the farm is shared (SHARED_FARM): its default OSF goes back to what it was
        was = "--keep-overlay" if osf[0]["keep_overlay"] else "--discard-overlay"
        farm.deckard("osf", "update", str(osf[0]["id"]), was, check=False)


@pytest.fixture
def connected(portal: Portal, request: pytest.FixtureRequest) -> Iterator[Portal]:
    """The viewer open on the user's desktop, its first frame drawn (connects when it is not)."""
    page = portal.page
    live = "!document.querySelector('#viewer.hidden') && document.body.dataset.firstFrame"
    if not page.evaluate(live) or page.locator("#progress").is_visible():
        if page.locator("#viewer").is_visible():  # a viewer left over after a failure or a takeover
            page.get_by_role("button", name="Disconnect").click()
        page.get_by_role("button", name=f"Connect to {DESK}").click()
        try:
            page.wait_for_function("() => document.body.dataset.firstFrame", timeout=60_000)
        except Exception:
            raise AssertionError(
                f"no first frame: {page.locator('#progress-text').inner_text()}\n"
                + portal.farm.diagnostics(portal.desktop_id)
            ) from None
    failed = request.session.testsfailed
    yield portal
    if request.session.testsfailed > failed:  # the call's report is in before the teardown runs
        FAILSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(FAILSHOTS / f"{request.node.name}.png"))


def _install_xclip(p: Portal) -> None:
    p.sh(f"test -e /tmp/xclip.py || cat > /tmp/xclip.py <<'EOF'\n{XCLIP}\nEOF", user=False)


def _x_clipboard(p: Portal) -> str | None:
    """The text in the desktop's CLIPBOARD selection, None while nobody owns it."""
    _install_xclip(p)
    out = p.farm.attach(p.desktop_id, "DISPLAY=:0 python3 /tmp/xclip.py get", user=USER)
    return out.stdout if out.returncode == 0 else None


def test_clipboard_text_sent_from_the_page_reaches_the_desktop(connected: Portal) -> None:
    from playwright.sync_api import expect

    page = connected.page
    toggle = page.get_by_role("button", name="Clipboard")
    toggle.click()
    expect(toggle).to_have_attribute("aria-expanded", "true")
    box = page.get_by_label("Clipboard (copied in the desktop")
    expect(box).to_be_focused()
    text = f"from the page {time.time_ns()} é"
    box.fill(text)
    page.get_by_role("button", name="Send to desktop").click()
    _wait(lambda: _x_clipboard(connected), 10, "the text in the desktop's X clipboard", lambda v: v == text, 0.3)
    toggle.click()
    expect(toggle).to_have_attribute("aria-expanded", "false")


def test_a_desktop_without_an_audio_server_says_no_sound_and_keeps_its_picture(connected: Portal) -> None:
    """The minimal image has no PulseAudio: the agent answers ``no_sound``, the page's speaker button says so."""
    from playwright.sync_api import expect

    page = connected.page
    button = page.locator("#sound-toggle")
    expect(button).to_have_text("No sound", timeout=15_000)
    expect(button).to_be_disabled()
    expect(page.get_by_label("Volume")).to_be_disabled()
    assert page.evaluate("document.body.dataset.firstFrame") and page.locator(CANVAS).is_visible()


def test_clipboard_text_copied_in_the_desktop_shows_in_the_page(connected: Portal) -> None:
    from playwright.sync_api import expect

    page = connected.page
    text = f"from the desktop {time.time_ns()} naïve"
    _install_xclip(connected)
    # the owner must answer Xvnc's requests, so it runs in the background until it loses the selection
    connected.sh(f"DISPLAY=:0 setsid python3 /tmp/xclip.py set '{text}' </dev/null >/tmp/xclip.log 2>&1 &")
    _wait(lambda: connected.sh("cat /tmp/xclip.log"), 5, "the script to own the clipboard", lambda v: "owner" in v)
    page.get_by_role("button", name="Clipboard").click()
    expect(page.get_by_label("Clipboard (copied in the desktop")).to_have_value(text, timeout=10_000)
    page.get_by_role("button", name="Clipboard").click()


# the canvas (the remote framebuffer) and the viewer's box, in whole pixels as noVNC asks for them
SIZES = """() => {
  const c = document.querySelector('#screen-canvas canvas');
  const box = document.querySelector('#screen-canvas').getBoundingClientRect();
  return {canvas: [c.width, c.height], box: [Math.floor(box.width), Math.floor(box.height)]};
}"""


def _fills(sizes: dict[str, list[int]]) -> bool:
    return sizes["canvas"] == sizes["box"]


def _xsize(p: Portal) -> tuple[int, int]:
    out = p.sh("DISPLAY=:0 xdpyinfo | grep dimensions:")  # "  dimensions:    1280x752 pixels (...)"
    w, h = out.split()[1].split("x")
    return int(w), int(h)


def _follows(p: Portal, what: str) -> list[int]:
    """Wait until the remote framebuffer (canvas and X screen) has the viewer's size; return that size."""
    sizes = _wait(lambda: p.page.evaluate(SIZES), 10, f"the desktop to follow {what}", _fills)
    _wait(lambda: _xsize(p), 5, f"the X screen to follow {what}", lambda v: v == tuple(sizes["canvas"]))
    return list(sizes["canvas"])


def test_remote_desktop_follows_the_window_size(connected: Portal) -> None:
    page = connected.page
    clip = page.get_by_role("button", name="Clipboard")
    _follows(connected, "the viewer")
    try:
        for width, height in ((1024, 700), (1200, 760)):
            page.set_viewport_size({"width": width, "height": height})
            w, h = _follows(connected, f"a {width}x{height} window")
            assert w == width and height - 80 < h < height, (w, h)  # the toolbar takes the rest
            xrandr = connected.sh("DISPLAY=:0 xrandr --current | head -1")
            assert f"current {w} x {h}" in xrandr, xrandr
        # the clipboard panel takes room from the desktop: it shrinks, then grows back when the panel closes
        clip.click()
        assert _follows(connected, "the clipboard panel opening")[1] < h
        clip.click()
        assert _follows(connected, "the clipboard panel closing") == [w, h]
    finally:
        if clip.get_attribute("aria-expanded") == "true":
            clip.click()
        page.set_viewport_size({"width": 1280, "height": 800})


def test_full_screen_control_enters_and_leaves_full_screen(connected: Portal) -> None:
    page = connected.page
    button = page.get_by_role("button", name="Full screen")
    button.click()
    page.wait_for_function("() => document.fullscreenElement?.id === 'viewer'", timeout=5_000)
    # the whole viewer is full screen: the desktop fills the screen and the toolbar stays there to leave
    screen = page.evaluate("[screen.width, screen.height]")
    rect = page.evaluate("(r => [r.width, r.height])(document.fullscreenElement.getBoundingClientRect())")
    assert rect == screen, f"the full-screen viewer is {rect}, the screen {screen}"
    _follows(connected, "full screen")
    assert page.get_by_role("toolbar", name="Desktop controls").is_visible()
    button.click()
    page.wait_for_function("() => document.fullscreenElement === null", timeout=5_000)
    assert page.locator("#viewer").is_visible(), "leaving full screen must not close the desktop"
    _follows(connected, "leaving full screen")


def test_disconnect_leaves_the_desktop_running_and_the_user_disconnected(connected: Portal) -> None:
    from playwright.sync_api import expect

    page = connected.page
    _wait(connected.row, 10, "user_state connected", lambda r: r["user_state"] == "connected")
    page.get_by_role("button", name="Disconnect").click()
    expect(page.locator("#viewer")).to_be_hidden()
    expect(page.get_by_role("button", name=f"Connect to {DESK}")).to_be_visible()
    row = _wait(connected.row, 15, "user_state disconnected", lambda r: r["user_state"] == "disconnected", 0.5)
    assert row["state"] == "running", "Disconnect must not stop the desktop"
    # and the card no longer says "connected" once the list refreshes
    card = page.get_by_role("listitem", name=f"Desktop {DESK}")
    expect(card).not_to_contain_text("connected", timeout=10_000)


def test_a_late_close_of_the_old_connection_does_not_break_a_new_one(portal: Portal, browser: Any) -> None:
    """Disconnect, then Connect again before the old WebSocket has finished closing (a slow network).

    The first connection's close is held back from the page, so noVNC gives up on it after its 3 s timeout
    while the new viewer is already drawn: that late "disconnect" must neither cover the new desktop with
    "Disconnected." nor leave the toolbar unable to disconnect it.  (Its own browser context: WebSocket routes
    cannot be removed from a page.)
    """
    from playwright.sync_api import expect

    _close_viewer(portal)
    ctx, page = _login(browser, portal.farm)
    held: list[Any] = []

    def route(ws: Any) -> None:
        server = ws.connect_to_server()
        if not held:  # the first connection: its close reaches the broker, never the page
            held.append(ws)
            ws.on_close(lambda _code, _reason: server.close())
            server.on_close(lambda _code, _reason: None)

    page.route_web_socket(lambda url: "/ws/connect" in url, route)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.get_by_role("button", name=f"Connect to {DESK}").click()
        page.wait_for_function("() => document.body.dataset.firstFrame", timeout=30_000)
        assert held, "the WebSocket was not routed"
        page.get_by_role("button", name="Disconnect").click()
        with page.expect_console_message(lambda m: "Disconnection timed out" in m.text, timeout=10_000):
            page.get_by_role("button", name=f"Connect to {DESK}").click()
            page.wait_for_function("() => document.body.dataset.firstFrame", timeout=30_000)
        expect(page.locator("#progress")).to_be_hidden()
        assert not errors, errors
        _wait(portal.row, 10, "user_state connected", lambda r: r["user_state"] == "connected")
        page.get_by_role("button", name="Disconnect").click()  # still drives the new connection
        _wait(portal.row, 15, "user_state disconnected", lambda r: r["user_state"] == "disconnected", 0.5)
    except BaseException:
        FAILSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(FAILSHOTS / "late-close.png"))
        raise
    finally:
        ctx.close()


def test_disconnect_while_the_ticket_is_on_its_way_opens_no_connection(portal: Portal) -> None:
    """Connect, then Disconnect before the ticket arrives: the late ticket must not open a hidden connection."""
    from playwright.sync_api import expect

    page = portal.page
    _close_viewer(portal)
    pending: list[Any] = []
    sockets: list[str] = []
    finished: list[str] = []

    def on_socket(ws: Any) -> None:
        sockets.append(ws.url)

    def on_finished(request: Any) -> None:
        finished.append(request.url)

    page.route("**/portal/desktops/*/ticket", lambda route: pending.append(route))  # held until closed
    page.on("websocket", on_socket)
    page.on("requestfinished", on_finished)
    try:
        page.get_by_role("button", name=f"Connect to {DESK}").click()
        deadline = time.monotonic() + 5
        while not pending and time.monotonic() < deadline:
            page.wait_for_timeout(20)  # lets Playwright deliver the route
        assert pending, "the portal asked for no ticket"
        page.get_by_role("button", name="Disconnect").click()
        expect(page.locator("#viewer")).to_be_hidden()
        pending[0].continue_()
        # the portal would open its WebSocket right after reading the ticket; its next list poll comes later
        page.wait_for_event(
            "request",
            lambda r: r.url.endswith("/portal/desktops") and any(u.endswith("/ticket") for u in finished),
            timeout=10_000,
        )
        assert not sockets, f"a connection was opened behind the closed viewer: {sockets}"
        assert portal.row()["user_state"] == "disconnected"
    finally:
        page.unroute_all()
        page.remove_listener("websocket", on_socket)
        page.remove_listener("requestfinished", on_finished)


def _files_panel(p: Portal) -> Any:
    """The viewer's file panel, open."""
    from playwright.sync_api import expect

    toggle = p.page.locator("#files-toggle")
    if toggle.get_attribute("aria-expanded") != "true":
        toggle.click()
    expect(p.page.locator("#files-panel")).to_be_visible()
    return p.page.locator("#files-panel")


def _sha256(p: Portal, path: str) -> str:
    return p.sh(f"sha256sum {path}").split()[0]


def test_files_dropped_or_picked_in_the_page_land_in_uploads_with_the_same_bytes(
    connected: Portal, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    page = connected.page
    _files_panel(connected)
    picked = tmp_path / f"picked-{time.time_ns()}.bin"
    picked.write_bytes(os.urandom(5 * 1024 * 1024 + 3))
    page.locator("#files-input").set_input_files(str(picked))
    done = page.locator(f"li.files-transfer[data-state=done]:has-text('{picked.name}')")
    expect(done).to_be_visible(timeout=60_000)
    assert _sha256(connected, f"~/Uploads/{picked.name}") == hashlib.sha256(picked.read_bytes()).hexdigest()

    # a file dropped on the desktop's picture (what a user drags from their file manager)
    dropped = f"dropped-{time.time_ns()}.txt"
    page.evaluate(
        """([name]) => {
            const dt = new DataTransfer();
            dt.items.add(new File(["dropped on the desktop\\n"], name, { type: "text/plain" }));
            const screen = document.querySelector("#screen");
            for (const type of ["dragenter", "dragover", "drop"])
                screen.dispatchEvent(new DragEvent(type, { dataTransfer: dt, bubbles: true, cancelable: true }));
        }""",
        [dropped],
    )
    expect(page.locator(f"li.files-transfer[data-state=done]:has-text('{dropped}')")).to_be_visible(timeout=30_000)
    assert connected.sh(f"cat ~/Uploads/{dropped}") == "dropped on the desktop\n"
    assert connected.sh(f"stat -c %U ~/Uploads/{dropped}").strip() == USER  # the user's file, not root's


def test_a_file_saved_in_downloads_downloads_with_the_same_bytes_and_nothing_leaves_the_home(
    connected: Portal, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    page = connected.page
    name = f"report-{time.time_ns()}.bin"
    connected.sh(f"mkdir -p ~/Downloads && head -c 3000001 /dev/urandom > ~/Downloads/{name}")
    connected.sh("ln -sf /etc/shadow ~/Downloads/shadow-link")  # a user's symlinks out of their home
    panel = _files_panel(connected)
    page.locator("#files-dir").fill("Downloads")
    page.locator("#files-open").click()
    entry = panel.locator(f"li.files-entry[data-name='{name}']")
    expect(entry).to_be_visible()
    with page.expect_download(timeout=60_000) as download:
        entry.locator("button.files-download").click()
    saved = tmp_path / "saved.bin"
    download.value.save_as(saved)
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == _sha256(connected, f"~/Downloads/{name}")

    # the link leads out of the home: not listed, and its folder cannot be opened through it either
    expect(panel.locator("li.files-entry[data-name='shadow-link']")).to_have_count(0)
    connected.sh("ln -sfn /etc ~/Downloads/etc-link")
    page.locator("#files-dir").fill("Downloads/etc-link")
    page.locator("#files-open").click()
    expect(page.locator("#files-error")).to_contain_text("home")  # outside_home
    expect(panel.locator("li.files-entry[data-name='passwd']")).to_have_count(0)


MARKER = "/usr/local/share/deckard-reset-marker"


def test_reset_my_desktop_discards_the_writable_layer_and_keeps_home(connected: Portal) -> None:
    from playwright.sync_api import expect

    page, farm = connected.page, connected.farm
    connected.sh(f"echo outside > {MARKER}", user=False)
    connected.sh("echo mine > ~/kept.txt")
    upper = FarmPaths(farm.home).overlay(connected.desktop_id) / "upper"
    assert (upper / MARKER.lstrip("/")).exists(), "the marker is not in the desktop's writable layer"

    page.get_by_role("button", name="Disconnect").click()
    reset = page.get_by_role("button", name=f"Reset {DESK} to a clean image")
    expect(reset).to_be_disabled()  # a running desktop cannot be reset
    page.get_by_role("button", name=f"Stop {DESK}").click()
    expect(reset).to_be_enabled(timeout=30_000)
    # the OSF keeps the layer: after the stop the marker is still there, only the reset can remove it
    assert (upper / MARKER.lstrip("/")).exists(), "the layer was dropped at stop: the reset would prove nothing"
    messages: list[str] = []

    def confirm(dialog: Any) -> None:
        messages.append(dialog.message)
        dialog.accept()

    page.once("dialog", confirm)
    reset.click()
    _wait(upper.exists, 10, "the writable layer to be removed", lambda exists: not exists)
    assert messages and "home" in messages[0], messages

    page.get_by_role("button", name=f"Connect to {DESK}").click()
    page.wait_for_function("() => document.body.dataset.firstFrame", timeout=60_000)
    assert connected.sh(f"test -e {MARKER} && echo present || echo gone", user=False).strip() == "gone"
    assert connected.sh("cat ~/kept.txt").strip() == "mine"
