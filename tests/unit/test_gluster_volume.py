"""GlusterFS set-up without glusterd: bricks and names checked before anything runs, gluster's words mapped to
stable codes, and where a node keeps its desktops' writable layers."""

from __future__ import annotations

from pathlib import Path

import pytest

from deckard.drivers.gluster import (
    Brick,
    VolumeHealth,
    _create_error,
    check_bricks,
    check_volume_name,
    glusterd_ping_warning,
)
from deckard.model.errors import BadInput, Conflict, Unavailable
from deckard.runtime.paths import FarmPaths
from deckard.runtime.settings import load_settings


@pytest.mark.parametrize("text", ["host", "host:relative", ":/srv/b", "h:/a b", ""])
def test_a_brick_is_host_and_absolute_path(text: str) -> None:
    with pytest.raises(BadInput) as e:
        Brick.parse(text)
    assert e.value.code == "bad_brick"


def test_a_brick_parses_and_prints_back() -> None:
    assert str(Brick.parse("st1.example:/srv/brick")) == "st1.example:/srv/brick"


def test_replica_sets_are_three_bricks_on_three_machines() -> None:
    ok = [Brick.parse(f"s{i}:/b") for i in (1, 2, 3)]
    check_bricks(ok)
    check_bricks([*ok, *(Brick.parse(f"s{i}:/c") for i in (1, 2, 3))])  # distributed-replicate
    for bad in (ok[:2], [*ok, Brick.parse("s4:/b")], [ok[0], ok[1], Brick.parse("s1:/other")], [ok[0], *ok[:2]]):
        with pytest.raises(BadInput):
            check_bricks(bad)


@pytest.mark.parametrize("name", ["", "a b", "-x", "x/y", "v" * 65])
def test_volume_names_are_checked(name: str) -> None:
    with pytest.raises(BadInput):
        check_volume_name(name)


@pytest.mark.parametrize(
    ("words", "kind", "code"),
    [
        ("volume create: deckard: failed: Volume deckard already exists", Conflict, "volume_exists"),
        (
            "volume create: v: failed: The brick h:/b is being created in the root partition. It is recommended "
            "that you don't use the system's root partition for storage backend.",
            BadInput,
            "brick_on_root",
        ),
        ("volume create: v: failed: /b is already part of a volume", Conflict, "brick_in_use"),
        ("volume create: v: failed: Host h is not in 'Peer in Cluster' state", Unavailable, "brick_unreachable"),
    ],
)
def test_gluster_failures_get_stable_codes(words: str, kind: type[Exception], code: str) -> None:
    err = _create_error("v", words)
    assert isinstance(err, kind) and err.code == code


def test_desktop_layers_stay_local_when_the_storage_root_is_gluster(tmp_path: Path) -> None:
    """Unpacked images and overlays under <home>/local with GlusterFS; images and homes stay shared."""
    assert FarmPaths(tmp_path).overlays == tmp_path / "storage/overlays"
    assert load_settings(tmp_path).paths.basefs == tmp_path / "storage/basefs"
    gluster = load_settings(tmp_path, storage={"gluster_servers": ["s1", "s2", "s3"]}).paths
    assert (gluster.overlays, gluster.basefs) == (tmp_path / "local/overlays", tmp_path / "local/basefs")
    assert (gluster.images, gluster.homes) == (tmp_path / "storage/images", tmp_path / "storage/homes")
    node = load_settings(tmp_path, node={"run_dir": tmp_path / "n2"}, storage={"local_layers": True})
    assert node.paths.overlays == tmp_path / "local/overlays"
    assert node.paths.demo_node(3).basefs == tmp_path / "local/basefs"
    off = load_settings(tmp_path, storage={"gluster_servers": ["s1"], "local_layers": False})
    assert off.paths.overlays == tmp_path / "storage/overlays"


def test_a_glusterd_that_never_gives_a_peer_up_is_pointed_out(tmp_path: Path) -> None:
    vol = tmp_path / "glusterd.vol"
    vol.write_text("volume management\n    type mgmt/glusterd\n    option ping-timeout 0\nend-volume\n")
    assert "option ping-timeout 10" in (glusterd_ping_warning(vol) or "")
    vol.write_text(vol.read_text().replace("ping-timeout 0", "ping-timeout 10"))
    assert glusterd_ping_warning(vol) is None
    assert glusterd_ping_warning(tmp_path / "missing.vol") is None


def test_a_volume_is_redundant_with_every_brick_up_healed_and_reached_by_every_node() -> None:
    bricks = [f"s{i}:/b" for i in (1, 2, 3)]

    def health(down: str = "", pending: int = 0, unreached: str = "") -> VolumeHealth:
        reached = {b: [n for n in ("n1", "n2") if not (b == unreached and n == "n2")] for b in bricks}
        return VolumeHealth("v", {b: b != down for b in bricks}, reached, ["n1", "n2"], pending)

    assert health().redundant
    assert not health(down="s2:/b").redundant
    assert not health(pending=3).redundant and not health(pending=-1).redundant
    assert not health(unreached="s3:/b").redundant  # node n2 has not reconnected to machine 3 yet
