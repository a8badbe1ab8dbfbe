"""A real container desktop asks the well-known metadata address and learns its own hostname and its user's SSH
key: the node's filter sends 169.254.169.254:80 to the metadata service on the bridge address (the container's
default route is the node), which answers by the desktop's source address.
"""

from __future__ import annotations

import base64
import json

import pytest

from deckard.testing import FarmProcess, wait_for

pytestmark = pytest.mark.e2e
SHARED_FARM = True  # tests/e2e/conftest.py: users and desktops of its own names, no farm-wide change kept

BLOB = (11).to_bytes(4, "big") + b"ssh-ed25519" + (32).to_bytes(4, "big") + bytes(range(32))
KEY = f"ssh-ed25519 {base64.b64encode(BLOB).decode()} meta@laptop"


def _get(farm: FarmProcess, desktop_id: int, path: str) -> str:
    """From inside the desktop, as an unprivileged process (uid 65534): the body, or 'failed …'."""
    code = (
        "import urllib.request\n"
        f"try: print(urllib.request.urlopen('http://169.254.169.254{path}', timeout=5).read().decode())\n"
        "except Exception as e: print('failed', type(e).__name__, e)\n"
    )
    out = farm.attach(desktop_id, f'setpriv --reuid=65534 --regid=65534 --clear-groups python3 -c "{code}"')
    return out.stdout.strip() or out.stderr.strip()


def test_a_container_desktop_reads_its_hostname_and_its_users_ssh_key_at_169_254_169_254(farm: FarmProcess) -> None:
    farm.deckard("user", "add", "meta", "--password", "meta-Pa55word!")
    farm.deckard("user", "update", "meta", "--ssh-key", KEY)
    farm.deckard("desktop", "add", "meta-desk", "--user", "meta")
    farm.deckard("desktop", "start", "meta-desk")
    desk = wait_for(lambda: (d := farm.desktop("meta-desk"))["state"] == "running" and d, 60, 0.2, "meta-desk to run")

    body = _get(farm, desk["id"], "/openstack/latest/meta_data.json")
    assert not body.startswith("failed"), f"{body}\n{farm.diagnostics(desk['id'])}"
    meta = json.loads(body)
    assert meta["hostname"] == "meta-desk" and meta["public_keys"] == {"key-0": KEY}
    assert _get(farm, desk["id"], "/latest/meta-data/hostname") == "meta-desk"
    assert _get(farm, desk["id"], "/latest/meta-data/public-keys/0/openssh-key") == KEY
    assert _get(farm, desk["id"], "/latest/meta-data/local-ipv4") == desk["ip"]
    assert "404" in _get(farm, desk["id"], "/openstack/latest/user_data")  # no user-data set: 404, like Nova
