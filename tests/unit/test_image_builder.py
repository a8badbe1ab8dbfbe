"""The image builder's naming: an unchanged recipe is never rebuilt, a changed agent only re-packs."""

from __future__ import annotations

from pathlib import Path

import pytest

from deckard.images import builder
from deckard.runtime.paths import image_digest


def test_image_name_is_recipe_hash_plus_files_hash() -> None:
    name = builder.image_filename()
    assert name == f"deckard-desktop-{builder.recipe_hash()}-{builder.files_hash()}.tar.zst"


def test_a_changed_agent_changes_only_the_files_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    recipe, files = builder.recipe_hash(), builder.files_hash()
    snapshot = builder._read_image_files()
    changed = [(dest, data + b"\n# changed\n", mode) for dest, data, mode in snapshot]
    assert builder.files_hash(changed) != files
    assert builder.recipe_hash() == recipe
    monkeypatch.setattr(builder, "PACKAGES", (*builder.PACKAGES, "htop"))
    assert builder.recipe_hash() != recipe


def test_the_agent_is_installed_with_a_python3_shebang() -> None:
    files = dict((dest, data) for dest, data, _ in builder._read_image_files())
    assert files["usr/local/sbin/deckard-vma"].startswith(b"#!/usr/bin/python3\n")
    assert b"<JWM>" in files["etc/jwm/system.jwmrc"]


def test_image_digest_is_the_sha256_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "img"
    path.write_bytes(b"abc")
    assert image_digest(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
