"""Guest metadata: the OpenStack and EC2 layouts, the NoCloud seed, the checks of SSH keys and user-data, the
packet filter's redirection of 169.254.169.254 and the service's rate limit."""

from __future__ import annotations

import base64
import ipaddress
import json

import pytest

from deckard.drivers.firewall import Table
from deckard.model.config_keys import config_key, parse_value
from deckard.model.egress import Protected
from deckard.model.errors import BadInput
from deckard.model.guest_metadata import (
    EC2_VERSION,
    MAX_SSH_KEYS,
    METADATA_PORT,
    GuestMetadata,
    answer,
    check_user_data,
    hostname_for,
    layout,
    load_ssh_keys,
    nocloud_files,
    normalise_path,
    parse_ssh_keys,
)
from deckard.node.metadata import RateLimit


def ssh_key(kind: str = "ssh-ed25519", fill: int = 1, comment: str = "ada@laptop") -> str:
    """A well-formed public key of ``kind`` (the blob starts with its type name, as OpenSSH writes it)."""
    name = kind.encode()
    blob = len(name).to_bytes(4, "big") + name + (32).to_bytes(4, "big") + bytes([fill]) * 32
    return f"{kind} {base64.b64encode(blob).decode()}" + (f" {comment}" if comment else "")


KEY = ssh_key()
SECRET_TOKEN = "agent-token-6f1c0b"  # what must never appear in anything a guest's process can read


def metadata(**changes: object) -> GuestMetadata:
    values: dict[str, object] = {
        "desktop_id": 7,
        "instance_id": "deckard-abc123-7",
        "hostname": "ada-desk",
        "name": "ada-desk",
        "tenant": "acme",
        "user": "ada",
        "ip": "10.231.0.17",
        "prefix_len": 22,
        "gateway": "10.231.0.1",
        "mac": "54:52:00:e7:00:11",
        "availability_zone": "node-1",
        "dns_servers": ("10.231.0.1",),
        "dns_search": ("corp.example",),
        "public_keys": (KEY,),
        "user_data": "#cloud-config\nruncmd: [touch, /tmp/hello]\n",
    }
    values.update(changes)
    return GuestMetadata(**values)  # type: ignore[arg-type]


def get(md: GuestMetadata | None, path: str) -> tuple[int, bytes]:
    status, _type, body = answer(md, path)
    return status, body


# ---- OpenStack ------------------------------------------------------------------------------------------------


def test_openstack_meta_data_names_the_instance_its_keys_zone_and_project() -> None:
    status, body = get(metadata(), "/openstack/latest/meta_data.json")
    doc = json.loads(body)
    assert status == 200
    assert doc["uuid"] == "deckard-abc123-7" and doc["hostname"] == "ada-desk" and doc["name"] == "ada-desk"
    assert doc["public_keys"] == {"key-0": KEY}
    assert doc["keys"] == [{"name": "key-0", "type": "ssh", "data": KEY}]
    assert doc["availability_zone"] == "node-1" and doc["launch_index"] == 0 and doc["project_id"] == "acme"


def test_openstack_network_data_gives_the_static_address_route_and_resolver() -> None:
    doc = json.loads(get(metadata(), "/openstack/latest/network_data.json")[1])
    assert doc["links"][0]["ethernet_mac_address"] == "54:52:00:e7:00:11"
    net = doc["networks"][0]
    assert net["type"] == "ipv4" and net["link"] == doc["links"][0]["id"]
    assert net["ip_address"] == "10.231.0.17" and net["netmask"] == "255.255.252.0"
    assert net["routes"] == [{"network": "0.0.0.0", "netmask": "0.0.0.0", "gateway": "10.231.0.1"}]
    assert doc["services"] == [{"type": "dns", "address": "10.231.0.1"}]


def test_openstack_user_data_is_served_raw_and_is_404_when_there_is_none_like_nova() -> None:
    assert get(metadata(), "/openstack/latest/user_data") == (200, b"#cloud-config\nruncmd: [touch, /tmp/hello]\n")
    assert get(metadata(user_data=""), "/openstack/latest/user_data")[0] == 404
    assert b"user_data" not in get(metadata(user_data=""), "/openstack/latest/")[1]


def test_the_openstack_root_lists_latest_only() -> None:
    assert get(metadata(), "/openstack") == (200, b"latest")
    assert get(metadata(), "/openstack/") == (200, b"latest")


# ---- EC2 ------------------------------------------------------------------------------------------------------


def test_ec2_meta_data_index_and_leaves() -> None:
    md = metadata()
    index = get(md, "/latest/meta-data/")[1].decode().splitlines()
    assert index == [
        "hostname",
        "instance-id",
        "local-hostname",
        "local-ipv4",
        "mac",
        "placement/",
        "public-keys/",
    ]
    for leaf, value in {
        "instance-id": "deckard-abc123-7",
        "hostname": "ada-desk",
        "local-hostname": "ada-desk",
        "local-ipv4": "10.231.0.17",
        "mac": "54:52:00:e7:00:11",
        "placement/availability-zone": "node-1",
        "public-keys/0/openssh-key": KEY,
    }.items():
        assert get(md, f"/latest/meta-data/{leaf}") == (200, value.encode()), leaf
    assert get(md, "/latest/meta-data/public-keys/") == (200, b"0=key-0")
    assert get(md, "/latest/meta-data/public-keys/0/") == (200, b"openssh-key")
    assert get(md, "/latest/user-data")[0] == 200
    assert get(metadata(user_data=""), "/latest/user-data")[0] == 404


def test_the_2009_04_04_version_is_the_same_as_latest() -> None:
    paths = layout(metadata())
    latest = {p.removeprefix("/latest"): v for p, v in paths.items() if p.startswith("/latest")}
    dated = {p.removeprefix(f"/{EC2_VERSION}"): v for p, v in paths.items() if p.startswith(f"/{EC2_VERSION}")}
    assert latest == dated and len(latest) > 5
    assert get(metadata(), "/") == (200, f"{EC2_VERSION}\nlatest".encode())


def test_a_user_without_keys_has_no_public_keys_directory() -> None:
    md = metadata(public_keys=())
    assert "public-keys/" not in get(md, "/latest/meta-data/")[1].decode()
    assert get(md, "/latest/meta-data/public-keys/0/openssh-key")[0] == 404
    assert json.loads(get(md, "/openstack/latest/meta_data.json")[1])["public_keys"] == {}


# ---- what is not served ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/latest/meta-data/iam/security-credentials/",
        "/latest/api/token",
        "/openstack/latest/password",
        "/openstack/latest/vendor_data.json",
        "/openstack/2012-08-10/meta_data.json",
        "/openstack/latest/../latest/meta_data.json",
        "/latest//meta-data/hostname",
        "http://169.254.169.254/latest/meta-data/hostname",
        "latest/meta-data/hostname",
        "/latest/meta-data/hostname\x00",
        "/etc/passwd",
        "/" + "a" * 300,
    ],
)
def test_paths_outside_the_layout_are_404(path: str) -> None:
    assert get(metadata(), path)[0] == 404


def test_a_caller_that_is_no_desktop_gets_404_for_every_path() -> None:
    assert get(None, "/openstack/latest/meta_data.json")[0] == 404
    assert get(None, "/")[0] == 404


def test_the_query_and_one_trailing_slash_are_ignored() -> None:
    assert normalise_path("/latest/meta-data/?x=1") == "/latest/meta-data"
    assert get(metadata(), "/latest/meta-data/hostname?format=json") == (200, b"ada-desk")


def test_no_secret_and_nothing_else_of_the_farm_is_in_any_answer_or_in_the_seed() -> None:
    """The layout is made from GuestMetadata alone, which has no field for a secret: the token handed to a driver
    with the same facts never shows up, neither over HTTP nor in the NoCloud seed."""
    md = metadata()
    assert SECRET_TOKEN not in repr(md)
    everything = b"".join(body for _type, body in layout(md).values()) + b"".join(nocloud_files(md).values())
    for word in (SECRET_TOKEN.encode(), b"token", b"password", b"secret"):
        assert word not in everything.lower()


# ---- NoCloud --------------------------------------------------------------------------------------------------


def test_the_nocloud_seed_has_meta_data_user_data_and_a_v2_network_config() -> None:
    files = nocloud_files(metadata())
    assert set(files) == {"meta-data", "user-data", "network-config"}
    meta = json.loads(files["meta-data"])  # JSON is YAML: cloud-init reads it as such
    assert meta == {"instance-id": "deckard-abc123-7", "local-hostname": "ada-desk", "public-keys": [KEY]}
    assert files["user-data"] == b"#cloud-config\nruncmd: [touch, /tmp/hello]\n"
    eth = json.loads(files["network-config"])["ethernets"]["eth0"]
    assert json.loads(files["network-config"])["version"] == 2
    assert eth["match"] == {"macaddress": "54:52:00:e7:00:11"} and eth["addresses"] == ["10.231.0.17/22"]
    assert eth["routes"] == [{"to": "0.0.0.0/0", "via": "10.231.0.1"}]
    assert eth["nameservers"] == {"addresses": ["10.231.0.1"], "search": ["corp.example"]}


def test_without_user_data_the_seed_gives_the_keys_in_a_cloud_config() -> None:
    user_data = nocloud_files(metadata(user_data=""))["user-data"].decode()
    header, body = user_data.split("\n", 1)
    assert header == "#cloud-config" and json.loads(body) == {"ssh_authorized_keys": [KEY]}
    bare = nocloud_files(metadata(user_data="", public_keys=()))["user-data"].decode()
    assert bare.split("\n", 1)[0] == "#cloud-config" and json.loads(bare.split("\n", 1)[1]) == {}


# ---- SSH keys -------------------------------------------------------------------------------------------------


def test_ssh_keys_of_every_openssh_type_are_taken_with_or_without_a_comment() -> None:
    kinds = ["ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521"]
    kinds += ["sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com"]
    keys = [KEY, ssh_key(comment=""), *(ssh_key(k, i + 2) for i, k in enumerate(kinds))]
    assert parse_ssh_keys(keys) == [KEY, *(ssh_key(k, i + 2) for i, k in enumerate(kinds))]  # a repeat is dropped


def test_blank_lines_comments_and_spacing_are_tidied() -> None:
    assert parse_ssh_keys(["", "  # my keys", f"  {KEY}  \r"]) == [KEY]
    assert parse_ssh_keys([]) == []


@pytest.mark.parametrize(
    "bad",
    [
        "hello",
        "ssh-dss " + ssh_key().split()[1],  # DSA: OpenSSH no longer takes it
        "ssh-ed25519 not*base64",
        "ssh-ed25519 QUJD",  # base64, but no key in it
        ssh_key().replace("ssh-ed25519", "ssh-rsa", 1),  # the blob says ed25519
        ssh_key()[:-8] + "x" * 9000,
        ssh_key(comment="a\x01b"),
        "-----BEGIN OPENSSH PRIVATE KEY-----",
    ],
)
def test_what_is_not_a_public_key_is_refused_with_bad_ssh_key(bad: str) -> None:
    with pytest.raises(BadInput) as e:
        parse_ssh_keys([bad])
    assert e.value.code == "bad_ssh_key"


def test_at_most_16_keys() -> None:
    keys = [ssh_key(fill=i) for i in range(MAX_SSH_KEYS + 1)]
    assert len(parse_ssh_keys(keys[:-1])) == MAX_SSH_KEYS
    with pytest.raises(BadInput) as e:
        parse_ssh_keys(keys)
    assert e.value.code == "bad_ssh_key"


def test_stored_keys_that_are_not_a_json_list_read_as_none() -> None:
    assert load_ssh_keys(json.dumps([KEY])) == [KEY]
    assert load_ssh_keys("") == [] and load_ssh_keys("{") == [] and load_ssh_keys('{"a": 1}') == []


# ---- user-data and hostnames ----------------------------------------------------------------------------------


def test_user_data_is_a_per_osf_key_of_at_most_64_kib() -> None:
    key = config_key("guest.user_data")
    assert key.per_osf and key.per_tenant and key.default == ""
    assert parse_value(key, "#cloud-config\n{}") == "#cloud-config\n{}"
    assert check_user_data("x" * 65536) == "x" * 65536
    for bad in ("x" * 65537, "é" * 40000, "a\x00b"):
        with pytest.raises(BadInput) as e:
            parse_value(key, bad)
        assert e.value.code == "bad_user_data"


def test_hostnames_are_dns_labels() -> None:
    assert hostname_for("Ada's Desk", 3) == "ada-s-desk"
    assert hostname_for("x" * 80, 3) == "x" * 63
    assert hostname_for("___", 3) == "desktop-3"


# ---- the filter and the service's limit -----------------------------------------------------------------------


def test_the_filter_sends_169_254_169_254_port_80_to_the_node_and_lets_it_in() -> None:
    prot = Protected(ipaddress.IPv4Network("10.231.0.0/22"), ipaddress.IPv4Address("10.231.0.1"), (), ())
    text = Table("deckard0", prot, {"10.231.0.11": ()}).render()
    assert f'iifname "deckard0" ip daddr 169.254.169.254 tcp dport 80 dnat ip to 10.231.0.1:{METADATA_PORT}' in text
    node_rules = text.split("chain from_desktop_to_node {", 1)[1].split("}", 1)[0]
    assert f"ip daddr 10.231.0.1 tcp dport {METADATA_PORT} accept" in node_rules
    assert node_rules.strip().endswith("drop")


def test_the_rate_limit_lets_a_burst_through_then_the_rate() -> None:
    now = [0.0]
    limit = RateLimit(rate=20, burst=40, clock=lambda: now[0])
    assert all(limit.allow("10.231.0.11") for _ in range(40))
    assert not limit.allow("10.231.0.11")
    assert limit.allow("10.231.0.12")  # another guest has its own bucket
    now[0] += 0.5
    assert sum(limit.allow("10.231.0.11") for _ in range(20)) == 10
