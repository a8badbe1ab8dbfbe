"""The image builder's naming: an unchanged recipe is never rebuilt, a changed agent only re-packs."""

from __future__ import annotations

from pathlib import Path

from deckard.images import builder
from deckard.images.profile import AGENT_PATH, ImageFile, load_profile
from deckard.runtime.paths import image_digest


def test_image_name_is_profile_plus_recipe_hash_plus_files_hash() -> None:
    minimal = load_profile("minimal")
    name = builder.image_filename()
    files = builder.image_files(minimal)
    assert name == f"deckard-minimal-{builder.recipe_hash(minimal)}-{builder.files_hash(files)}.tar.zst"


def test_a_changed_agent_changes_only_the_files_hash() -> None:
    minimal = load_profile("minimal")
    recipe, files = builder.recipe_hash(minimal), builder.image_files(minimal)
    changed = [ImageFile(f.dest, f.data + b"\n# changed\n", f.mode) if f.dest == AGENT_PATH else f for f in files]
    assert builder.files_hash(changed) != builder.files_hash(files)
    assert builder.recipe_hash(minimal) == recipe


def test_the_agent_is_installed_with_a_python3_shebang() -> None:
    files = {f.dest: f.data for f in builder.image_files()}
    assert files["usr/local/sbin/deckard-vma"].startswith(b"#!/usr/bin/python3\n")
    assert b"<JWM>" in files["etc/jwm/system.jwmrc"]


def test_image_digest_is_the_sha256_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "img"
    path.write_bytes(b"abc")
    assert image_digest(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
