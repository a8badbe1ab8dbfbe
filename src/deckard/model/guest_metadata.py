"""What a guest learns about itself at boot: the OpenStack and EC2 metadata layouts and a NoCloud seed.

Images that run cloud-init (and tools written for clouds) expect their hostname, network, SSH keys and user-data
either from an HTTP service on the link-local address 169.254.169.254 (OpenStack's ``/openstack/latest/...``,
EC2's ``/latest/meta-data/...``) or from a NoCloud seed on a config disk.  This module renders both from one
:class:`GuestMetadata`; ``node/metadata.py`` serves the layouts, the VM driver writes the seed.

What is never in here: the agent's token or any other secret.  Every process in a guest can ask the HTTP
service, so it only says what the desktop's user may know anyway; the VM driver adds the agent token to the
root-only config disk itself, beside :func:`nocloud_files`.

SSH public keys are checked here too (:func:`parse_ssh_keys`): the admin API, the CLI and the portal store a
user's keys only in the forms OpenSSH accepts in ``authorized_keys``.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from deckard.model.errors import BadInput

METADATA_ADDRESS = "169.254.169.254"  # where guests look (EC2's and OpenStack's link-local address), port 80
METADATA_PORT = 8775  # where the node serves it, on its bridge address (Nova's port); the filter maps one to the other
EC2_VERSION = "2009-04-04"  # the oldest EC2 layout cloud-init reads; an alias of ``latest``
MAX_USER_DATA = 64 * 1024
MAX_SSH_KEYS = 16
MAX_SSH_KEY_BYTES = 8 * 1024

KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)
_KEY = re.compile(r"(?P<type>\S+) +(?P<blob>[A-Za-z0-9+/]+={0,2})(?: +(?P<comment>[^\x00-\x1f\x7f]*))?")


@dataclass(frozen=True)
class GuestMetadata:
    """One desktop's facts as its guest sees them (no secrets: any process in the guest may read them)."""

    desktop_id: int
    instance_id: str  # deckard-<farm id>-<desktop id>: stable for the desktop, unique across farms
    hostname: str
    name: str  # the desktop's name as administrators see it
    tenant: str
    user: str  # the user's login
    ip: str
    prefix_len: int
    gateway: str
    mac: str
    availability_zone: str  # the node's name
    dns_servers: tuple[str, ...] = ()
    dns_search: tuple[str, ...] = ()
    public_keys: tuple[str, ...] = ()
    user_data: str = ""


# ---- checks ---------------------------------------------------------------------------------------------------


def hostname_for(name: str, desktop_id: int) -> str:
    """A DNS label from a desktop's name (lowercase letters, digits, '-'; at most 63), else ``desktop-<id>``."""
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63].rstrip("-")
    return label or f"desktop-{desktop_id}"


def check_user_data(text: str) -> str:
    """User-data for the guests of a tenant or OSF: any text up to 64 KiB (422 ``bad_user_data``)."""
    if not isinstance(text, str):
        raise BadInput("user-data is text (a #cloud-config document or a script)", code="bad_user_data")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_USER_DATA:
        raise BadInput(
            f"user-data is {size} bytes: at most {MAX_USER_DATA} (64 KiB) are served to guests; "
            "fetch larger content from the user-data instead",
            code="bad_user_data",
            details={"maximum": MAX_USER_DATA},
        )
    if "\x00" in text:
        raise BadInput("user-data must not contain NUL characters", code="bad_user_data")
    return text


def _check_key(line: str) -> str:
    shown = line[:40] + ("…" if len(line) > 40 else "")
    if len(line.encode()) > MAX_SSH_KEY_BYTES:
        raise BadInput(f"the SSH key {shown!r} is longer than {MAX_SSH_KEY_BYTES} bytes", code="bad_ssh_key")
    m = _KEY.fullmatch(line)
    if m is None or m["type"] not in KEY_TYPES:
        raise BadInput(
            f"{shown!r} is not an SSH public key: paste a line of a .pub file, e.g. `ssh-ed25519 AAAA… me@laptop` "
            f"(types: {', '.join(KEY_TYPES)})",
            code="bad_ssh_key",
        )
    try:
        blob = base64.b64decode(m["blob"], validate=True)
    except (binascii.Error, ValueError):
        raise BadInput(f"the SSH key {shown!r} is not valid base64", code="bad_ssh_key") from None
    # the blob starts with its own type name (RFC 4253 string): a key pasted under the wrong type is refused
    n = int.from_bytes(blob[:4], "big") if len(blob) >= 4 else -1
    if n <= 0 or blob[4 : 4 + n] != m["type"].encode():
        raise BadInput(f"the SSH key {shown!r} is damaged: its data is not a {m['type']} key", code="bad_ssh_key")
    comment = (m["comment"] or "").strip()
    return f"{m['type']} {m['blob']}" + (f" {comment}" if comment else "")


def parse_ssh_keys(keys: Iterable[str]) -> list[str]:
    """Public SSH keys as stored: each checked (422 ``bad_ssh_key``), blank lines dropped, repeats dropped, at
    most 16."""
    out: list[str] = []
    seen: set[str] = set()
    for raw in keys:
        if not isinstance(raw, str):
            raise BadInput("an SSH key is a line of text", code="bad_ssh_key")
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key = _check_key(line)
        ident = " ".join(key.split(" ")[:2])
        if ident in seen:
            continue
        seen.add(ident)
        out.append(key)
    if len(out) > MAX_SSH_KEYS:
        raise BadInput(
            f"{len(out)} SSH keys: a user has at most {MAX_SSH_KEYS}",
            code="bad_ssh_key",
            details={"maximum": MAX_SSH_KEYS},
        )
    return out


def load_ssh_keys(stored: str | None) -> list[str]:
    """``users.ssh_keys`` (a JSON list) as a list; anything else reads as no keys."""
    try:
        value = json.loads(stored or "[]")
    except ValueError:
        return []
    return [k for k in value if isinstance(k, str)] if isinstance(value, list) else []


# ---- the HTTP layouts -----------------------------------------------------------------------------------------

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
OCTETS = "application/octet-stream"


def _json(value: Any) -> tuple[str, bytes]:
    return JSON, json.dumps(value, indent=2, sort_keys=True).encode()


def _text(lines: Iterable[str]) -> tuple[str, bytes]:
    return TEXT, "\n".join(lines).encode()


def _netmask(prefix_len: int) -> str:
    return str(ipaddress.IPv4Network(f"0.0.0.0/{prefix_len}").netmask)


def openstack_meta_data(md: GuestMetadata) -> dict[str, Any]:
    names = [f"key-{i}" for i in range(len(md.public_keys))]
    return {
        "uuid": md.instance_id,
        "name": md.name,
        "hostname": md.hostname,
        "public_keys": dict(zip(names, md.public_keys, strict=True)),
        "keys": [{"name": n, "type": "ssh", "data": k} for n, k in zip(names, md.public_keys, strict=True)],
        "availability_zone": md.availability_zone,
        "launch_index": 0,
        "project_id": md.tenant,
        "meta": {"deckard_user": md.user},
    }


def openstack_network_data(md: GuestMetadata) -> dict[str, Any]:
    """OpenStack's ``network_data.json``: one link, one static IPv4 network with the default route, the DNS."""
    return {
        "links": [{"id": "eth0", "type": "phy", "ethernet_mac_address": md.mac, "vif_id": md.instance_id}],
        "networks": [
            {
                "id": "network0",
                "type": "ipv4",
                "link": "eth0",
                "ip_address": md.ip,
                "netmask": _netmask(md.prefix_len),
                "routes": [{"network": "0.0.0.0", "netmask": "0.0.0.0", "gateway": md.gateway}],
                "network_id": "deckard",
                "dns_nameservers": list(md.dns_servers),
                "dns_search": list(md.dns_search),
            }
        ],
        "services": [{"type": "dns", "address": a} for a in md.dns_servers],
    }


def _ec2_meta_data(md: GuestMetadata) -> dict[str, tuple[str, bytes]]:
    leaves = {
        "instance-id": md.instance_id,
        "hostname": md.hostname,
        "local-hostname": md.hostname,
        "local-ipv4": md.ip,
        "mac": md.mac,
        "placement/availability-zone": md.availability_zone,
    }
    out = {k: _text([v]) for k, v in leaves.items()}
    out["placement"] = _text(["availability-zone"])
    if md.public_keys:
        out["public-keys"] = _text(f"{i}=key-{i}" for i in range(len(md.public_keys)))
        for i, key in enumerate(md.public_keys):
            out[f"public-keys/{i}"] = _text(["openssh-key"])
            out[f"public-keys/{i}/openssh-key"] = _text([key])
    # the index: leaves by name, directories with a trailing '/'
    out[""] = _text(sorted(k if k not in ("placement", "public-keys") else k + "/" for k in out if "/" not in k))
    return out


def layout(md: GuestMetadata) -> dict[str, tuple[str, bytes]]:
    """Every path the metadata service answers for ``md`` (no trailing '/'): → (content type, body)."""
    user_data = md.user_data.encode()
    out: dict[str, tuple[str, bytes]] = {"/": _text([EC2_VERSION, "latest"])}
    # OpenStack
    out["/openstack"] = _text(["latest"])
    out["/openstack/latest"] = _text(["meta_data.json", "network_data.json", *(["user_data"] if user_data else [])])
    out["/openstack/latest/meta_data.json"] = _json(openstack_meta_data(md))
    out["/openstack/latest/network_data.json"] = _json(openstack_network_data(md))
    if user_data:
        out["/openstack/latest/user_data"] = (OCTETS, user_data)
    # EC2, as ``latest`` and as its oldest version
    for version in ("latest", EC2_VERSION):
        out[f"/{version}"] = _text(["meta-data/", *(["user-data"] if user_data else [])])
        for path, answer in _ec2_meta_data(md).items():
            out[f"/{version}/meta-data" + (f"/{path}" if path else "")] = answer
        if user_data:
            out[f"/{version}/user-data"] = (OCTETS, user_data)
    return out


def normalise_path(target: str) -> str | None:
    """A request target as a key of :func:`layout`: the query dropped, one trailing '/' dropped; None for anything
    that is not a plain absolute path (``..``, ``//``, an absolute URL, control characters)."""
    path = target.split("?", 1)[0].split("#", 1)[0]
    if not path.startswith("/") or len(path) > 256 or any(c < "!" or c == "\x7f" for c in path):
        return None
    if path != "/":
        path = path.removesuffix("/")
    if "//" in path or any(part in (".", "..") for part in path.split("/")):
        return None
    return path


def answer(md: GuestMetadata | None, target: str) -> tuple[int, str, bytes]:
    """(HTTP status, content type, body) of a GET for ``target``: 404 for any path outside the layout and for a
    caller the node does not know."""
    path = normalise_path(target)
    if md is None or path is None:
        return 404, TEXT, b"not found\n"
    found = layout(md).get(path)
    if found is None:
        return 404, TEXT, b"not found\n"
    return 200, *found


# ---- the NoCloud seed -----------------------------------------------------------------------------------------


def nocloud_files(md: GuestMetadata) -> dict[str, bytes]:
    """The files of a NoCloud seed (``cidata`` config disk): ``meta-data``, ``user-data``, ``network-config``.

    JSON is written where cloud-init reads YAML (JSON is YAML).  User-data is the OSF's; when there is none, a
    ``#cloud-config`` giving cloud-init's default user the user's SSH keys.  The agent's token is not here: the
    VM driver adds it to the same disk, which only root in the guest can read."""
    meta = {"instance-id": md.instance_id, "local-hostname": md.hostname}
    if md.public_keys:
        meta["public-keys"] = list(md.public_keys)  # type: ignore[assignment]
    if md.user_data:
        user_data = md.user_data.encode()
    else:
        config = {"ssh_authorized_keys": list(md.public_keys)} if md.public_keys else {}
        user_data = ("#cloud-config\n" + json.dumps(config, indent=2) + "\n").encode()
    nameservers: dict[str, list[str]] = {"addresses": list(md.dns_servers)}
    if md.dns_search:
        nameservers["search"] = list(md.dns_search)
    network = {
        "version": 2,
        "ethernets": {
            "eth0": {
                "match": {"macaddress": md.mac},
                "set-name": "eth0",
                "addresses": [f"{md.ip}/{md.prefix_len}"],
                "routes": [{"to": "0.0.0.0/0", "via": md.gateway}],
                "nameservers": nameservers,
            }
        },
    }
    return {
        "meta-data": (json.dumps(meta, indent=2) + "\n").encode(),
        "user-data": user_data,
        "network-config": (json.dumps(network, indent=2) + "\n").encode(),
    }
