"""The standard image in a real farm: imported with its profile and unpacked at once, a desktop started from it
through the broker runs the Xfce panel with the client's keyboard layout, and Firefox ESR renders a page inside the
desktop's sandbox (an unprivileged container that may not create user namespaces).  One desktop start in all."""

from __future__ import annotations

import asyncio
import base64
import struct
import zlib
from pathlib import Path

from deckard.client import broker as qvd
from deckard.client.rfb import grab_framebuffer, is_blank
from deckard.images.builder import read_image_metadata
from deckard.runtime.paths import FarmPaths
from deckard.testing import FarmProcess, wait_for

SHARED_FARM = True  # tests/e2e/conftest.py: users and desktops of its own names, no farm-wide change kept
PASSWORD = "std-desktop-pw"
PAGE_RGB = (204, 0, 51)
PAGE = "<html><body style='margin:0;background:#cc0033'><h1>Deckard</h1></body></html>"


def png_pixel(data: bytes, x: int, y: int) -> tuple[int, int, int]:
    """The RGB of one pixel of an 8-bit, non-interlaced RGB or RGBA PNG (what Firefox writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width, height, channels = 8, b"", 0, 0, 0
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos : pos + 4]), data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and colour in (2, 6), f"unexpected PNG format {depth}/{colour}"
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw, stride = zlib.decompress(idat), width * channels
    rows: list[bytearray] = []
    prev = bytearray(stride)
    for row in range(min(y + 1, height)):
        kind, line = raw[row * (stride + 1)], bytearray(raw[row * (stride + 1) + 1 : (row + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up, corner = prev[i], prev[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 0xFF
        rows.append(line)
        prev = line
    px = rows[y][x * channels : x * channels + 3]
    return px[0], px[1], px[2]


async def framebuffer_drawn(farm: FarmProcess, login: str, desktop_id: int, keyboard: str) -> bool:
    params = {"qvd.client.keyboard": keyboard}  # what QVD's client sends
    reader, writer = await qvd.connect(farm.broker, login, PASSWORD, farm.ca, desktop_id, params=params)
    try:
        _w, _h, pixels = await asyncio.wait_for(grab_framebuffer(reader, writer, until_drawn=15), 60)
        return not is_blank(pixels)
    finally:
        writer.close()


def test_a_standard_desktop_runs_xfce_and_firefox_with_the_clients_keyboard(
    farm: FarmProcess, standard_image: Path
) -> None:
    assert (read_image_metadata(standard_image) or {}).get("profile") == "standard"
    farm.deckard("image", "import", str(standard_image), "--tag", "standard")
    images = farm.json("image", "list")
    assert isinstance(images, list)
    by_tag = {tag: image for image in images for tag in image["tags"]}
    assert by_tag["standard"]["profile"] == "standard"  # read from the image file itself
    assert by_tag["default"]["profile"] == "minimal"  # `deckard up` of this farm
    # both were unpacked when they were registered: no desktop pays for it
    basefs = FarmPaths(farm.home).basefs
    for tag in ("default", "standard"):
        assert list(basefs.glob(f"{by_tag[tag]['id']}-u*")), f"the {tag} image is not unpacked"

    farm.deckard("user", "add", "ada", "--password", PASSWORD)
    farm.deckard("desktop", "add", "ada-std", "--user", "ada", "--tag", "standard")
    desktop_id = farm.desktop("ada-std")["id"]
    try:
        # started by the broker, like any connect; the client says its keyboard layout
        assert asyncio.run(framebuffer_drawn(farm, "ada", desktop_id, keyboard="pc105/de"))
        wait_for(lambda: farm.attach(desktop_id, "pgrep -u ada -x xfce4-panel").returncode == 0, 30, 0.5, "panel")
        query = farm.attach(desktop_id, "DISPLAY=:0 setxkbmap -query", user="ada").stdout
        assert "layout:     de" in query, query
        # xfwm4's settings come with the image (images/profiles/standard/xfwm4.xml): a user who never ran a session
        # has them, so their first session's window manager does not write (and grab its keys again for) each one
        fresh = farm.attach(
            desktop_id, "cd / && HOME=$(mktemp -d) dbus-run-session -- xfconf-query -c xfwm4 -p /general/theme"
        )
        assert fresh.stdout.strip() == "Default", fresh.stdout + fresh.stderr

        farm.attach(desktop_id, f'printf "%s" "{PAGE}" > /tmp/page.html && chmod 644 /tmp/page.html')
        shot = farm.attach(
            desktop_id,
            "cd /tmp && firefox-esr --headless --window-size 400,300 --screenshot /tmp/ff.png file:///tmp/page.html"
            " >/tmp/ff.log 2>&1; base64 -w0 /tmp/ff.png",
            user="ada",
        )
        assert shot.returncode == 0 and shot.stdout, farm.attach(desktop_id, "cat /tmp/ff.log").stdout
        assert png_pixel(base64.b64decode(shot.stdout), 200, 250) == PAGE_RGB
    except BaseException:
        print(farm.diagnostics(desktop_id))
        raise
