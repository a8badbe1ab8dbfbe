"""Image build profiles: read from TOML, checked strictly, layered, and hashed into the cache key they build."""

from __future__ import annotations

import asyncio
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from deckard.images import builder
from deckard.images.profile import (
    AGENT_PATH,
    OPENER_PATH,
    SESSION_PATH,
    SHELL_PATH,
    VM_PACKAGES,
    ImageFile,
    Profile,
    builtin_profiles,
    load_profile,
    load_profile_file,
    validate_dest,
    validate_package,
    with_packages,
    with_vm,
)
from deckard.model.errors import BadInput


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def own_profile(tmp_path: Path, body: str, name: str = "office") -> Path:
    write(tmp_path / "session.sh", "#!/bin/sh\nexec xterm\n")
    return write(tmp_path / f"{name}.toml", body)


# ---- the built-in profiles -------------------------------------------------------------------------------
def test_minimal_and_standard_are_built_in_and_standard_extends_minimal() -> None:
    assert {"minimal", "standard"} <= set(builtin_profiles())
    minimal, standard = load_profile("minimal"), load_profile("standard")
    assert minimal.parent is None and standard.parent == minimal
    assert [layer.name for layer in standard.chain()] == ["minimal", "standard"]
    # standard installs only what minimal lacks: its layer starts from minimal's rootfs
    assert not set(standard.packages) & set(minimal.packages)
    assert set(minimal.packages) < set(standard.all_packages())


def test_minimal_has_what_the_agent_needs_and_a_jwm_session() -> None:
    minimal = load_profile("minimal")
    for package in ("tigervnc-standalone-server", "python3", "passwd", "libxss1", "jwm"):
        assert package in minimal.packages
    # the window manager is the desktop shell a warm guest draws alone; the session runs it after the user's part
    assert b"exec jwm" in (minimal.shell_script() or b"")
    session = minimal.session_script() or b""
    assert b"setxkbmap" in session and b"DECKARD_SHELL_UP" in session and b". /etc/deckard/xshell" in session
    assert b"<JWM>" in next(f.data for f in minimal.all_files() if f.dest == "etc/jwm/system.jwmrc")


def test_standard_is_an_xfce_desktop_with_firefox_languages_and_its_own_session() -> None:
    standard = load_profile("standard")
    for package in ("xfce4-session", "xfce4-panel", "thunar", "mousepad", "xfce4-terminal", "firefox-esr", "locales"):
        assert package in standard.packages
    assert "de_DE.UTF-8" in standard.all_locales() and {"de", "pt_BR"} <= set(standard.languages())
    session = standard.session_script() or b""
    assert b"xfce4-session" in session and b"setxkbmap" in session
    assert standard.shell_script() is None  # its own session: minimal's JWM shell does not come along
    files = {f.dest: f for f in standard.all_files()}
    # minimal's files come along; Firefox gets its policies (no first-run pages, no sandbox nag)
    assert "etc/jwm/system.jwmrc" in files
    assert json.loads(files["usr/share/firefox-esr/distribution/policies.json"].data)["policies"]["DisableAppUpdate"]
    assert b"warn_unprivileged_namespaces" in files["etc/firefox-esr/deckard.js"].data


def test_an_unknown_built_in_profile_is_refused_with_the_list() -> None:
    with pytest.raises(BadInput) as err:
        load_profile("gnome")
    assert err.value.code == "unknown_profile" and "minimal" in err.value.message


# ---- validation ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["libc6", "g++", "firefox-esr-l10n-pt-br", "xfonts-base", "python3.11"])
def test_debian_package_names_are_accepted(name: str) -> None:
    assert validate_package(name) == name


@pytest.mark.parametrize(
    "name", ["", "a", "Firefox", "pkg-", "-pkg", "pkg=1.0", "pkg/bookworm", "pkg;rm", "../x", "pkg name", "p" * 101]
)
def test_anything_else_is_not_a_package_name(name: str) -> None:
    with pytest.raises(BadInput) as err:
        validate_package(name)
    assert err.value.code == "bad_package"


@pytest.mark.parametrize(
    ("dest", "why"),
    [
        ("/etc/passwd", "relative"),
        ("etc/../../x", "relative"),
        ("etc/./x", "relative"),
        ("etc//x", "relative"),
        ("lib/x", "usr/lib/x"),
        (SESSION_PATH, "set `session`"),
        (SHELL_PATH, "set `shell`"),
        (OPENER_PATH, "belongs to Deckard"),
        (AGENT_PATH, "belongs to Deckard"),
        ("etc/resolv.conf", "belongs to Deckard"),
    ],
)
def test_file_destinations_stay_inside_the_image_and_off_deckards_files(dest: str, why: str) -> None:
    with pytest.raises(BadInput) as err:
        validate_dest(dest)
    assert why in err.value.message


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ('packages = ["htop"]\nsesion = "session.sh"\n', "unknown key(s) sesion"),
        ('packages = "htop"\nsession = "session.sh"\n', "list of strings"),
        ('packages = ["Htop"]\nsession = "session.sh"\n', "invalid Debian package name"),
        ('session = "../session.sh"\n', "without '..'"),
        ('session = "/etc/passwd"\n', "relative to the profile"),
        ('session = "missing.sh"\n', "cannot read"),
        ('packages = ["htop"]\n', "no session script"),
        ('packages = ["htop"]\nshell = "session.sh"\n', "goes with the `session` script"),
        ('locales = ["german"]\nsession = "session.sh"\n', "ll_CC.UTF-8"),
        ('parent = "nope"\n', "neither beside it nor built in"),
        ('session = "session.sh"\n[files]\n"etc/x" = { source = "session.sh", mode = "rwx" }\n', "octal"),
        ('session = "session.sh"\n[files]\n"etc/x" = 7\n', "needs a source path"),
        ("session = [\n", "not valid TOML"),
    ],
)
def test_a_bad_profile_file_is_refused_before_any_build(tmp_path: Path, body: str, why: str) -> None:
    with pytest.raises(BadInput) as err:
        load_profile_file(own_profile(tmp_path, body))
    assert err.value.code == "bad_image_profile" or err.value.code == "bad_package"
    assert why in err.value.message


def test_a_profile_name_must_fit_an_image_version(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="invalid profile name"):
        load_profile_file(own_profile(tmp_path, 'session = "session.sh"\n', name="Office_Suite"))


def test_profiles_that_extend_each_other_in_a_circle_are_refused(tmp_path: Path) -> None:
    write(tmp_path / "a.toml", 'parent = "b"\n')
    write(tmp_path / "b.toml", 'parent = "a"\n')
    with pytest.raises(BadInput, match="in a circle: a → b → a"):
        load_profile_file(tmp_path / "a.toml")


# ---- an administrator's own profile ----------------------------------------------------------------------
def test_an_own_profile_extends_a_built_in_one_and_adds_packages_files_and_locales(tmp_path: Path) -> None:
    write(tmp_path / "files/motd", "welcome\n")
    path = own_profile(
        tmp_path,
        'parent = "standard"\npackages = ["gimp", "gimp"]\nlocales = ["it_IT.UTF-8"]\n'
        '[files]\n"etc/motd" = "files/motd"\n"usr/local/bin/hello" = { source = "session.sh", mode = "0755" }\n',
    )
    office = load_profile_file(path)
    assert office.name == "office" and office.parent == load_profile("standard")
    assert office.packages == ("gimp",)  # listed once; locales come with standard already
    assert office.session_script() == load_profile("standard").session_script()  # inherited
    files = {f.dest: f for f in office.all_files()}
    assert files["etc/motd"] == ImageFile("etc/motd", b"welcome\n", 0o644)
    assert files["usr/local/bin/hello"].mode == 0o755
    assert "it_IT.UTF-8" in office.all_locales() and "de_DE.UTF-8" in office.all_locales()


def test_a_parent_beside_the_file_wins_over_a_built_in_one(tmp_path: Path) -> None:
    write(tmp_path / "session.sh", "#!/bin/sh\nexec twm\n")
    write(tmp_path / "minimal.toml", 'packages = ["twm"]\nsession = "session.sh"\n')
    child = load_profile_file(write(tmp_path / "kiosk.toml", 'parent = "minimal"\npackages = ["chromium"]\n'))
    assert child.parent is not None and child.parent.packages == ("twm",)


def test_locales_bring_the_locales_package_with_them(tmp_path: Path) -> None:
    profile = load_profile_file(own_profile(tmp_path, 'locales = ["fr_FR.UTF-8"]\nsession = "session.sh"\n'))
    assert "locales" in profile.packages and profile.languages() == ["fr", "fr_FR"]


# ---- recipes and names -----------------------------------------------------------------------------------
def test_a_recipe_hash_is_stable_and_standard_depends_on_minimal() -> None:
    minimal, standard = load_profile("minimal"), load_profile("standard")
    assert builder.recipe_hash(standard) == builder.recipe_hash(load_profile("standard"))
    assert builder.recipe_hash(minimal) != builder.recipe_hash(standard)
    # a changed base changes every layer above it: standard is rebuilt on the new minimal
    changed_base = Profile("minimal", packages=(*minimal.packages, "htop"), session=minimal.session)
    rebased = Profile("standard", parent=changed_base, packages=standard.packages, locales=standard.locales)
    assert builder.recipe_hash(rebased) != builder.recipe_hash(standard)
    # the mirror, the description and the files are not part of what apt produces
    same = Profile("standard", description="other words", parent=minimal, packages=standard.packages)
    assert builder.recipe_hash(Profile("x", parent=minimal, packages=standard.packages)) == builder.recipe_hash(same)


def test_the_builder_version_is_part_of_every_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    standard = load_profile("standard")
    before = builder.recipe_hash(standard), builder.recipe_hash(standard.parent)
    monkeypatch.setattr(builder, "BUILDER_VERSION", "next")
    assert builder.recipe_hash(standard) != before[0] and builder.recipe_hash(standard.parent) != before[1]


def test_files_change_the_image_name_but_not_the_cached_rootfs() -> None:
    standard = load_profile("standard")
    files = builder.image_files(standard)
    changed = [ImageFile(f.dest, f.data + b"\n# changed\n", f.mode) for f in files]
    assert builder.files_hash(changed) != builder.files_hash(files)
    name = builder.image_filename(standard, files)
    assert name == f"deckard-standard-{builder.recipe_hash(standard)}-{builder.files_hash(files)}.tar.zst"
    assert len(name.split(".")[0]) <= 64  # the image's version in the database
    assert builder.image_filename(standard, changed) != name


def test_the_agent_and_the_session_script_are_installed_executable() -> None:
    files = {f.dest: f for f in builder.image_files(load_profile("minimal"))}
    assert files[AGENT_PATH].data.startswith(b"#!/usr/bin/python3\n") and files[AGENT_PATH].mode == 0o755
    assert files[SESSION_PATH].mode == 0o755 and b"xshell" in files[SESSION_PATH].data
    assert files[SHELL_PATH].mode == 0o755 and b"exec jwm" in files[SHELL_PATH].data
    assert files[OPENER_PATH].data.startswith(b"#!/usr/bin/python3 -IS\n") and files[OPENER_PATH].mode == 0o755
    assert SHELL_PATH not in {f.dest for f in builder.image_files(load_profile("standard"))}


def test_added_packages_are_one_more_layer_on_top_of_the_profile() -> None:
    standard = load_profile("standard")
    more = with_packages(standard, ["htop", "gimp", "htop"])
    assert more.name == "standard" and more.parent == standard and more.packages == ("htop", "gimp")
    assert builder.recipe_hash(more) != builder.recipe_hash(standard)
    assert with_packages(standard, ["firefox-esr", "xterm"]) is standard  # nothing new: the same image
    with pytest.raises(BadInput):
        with_packages(standard, ["htop; rm -rf /"])


def test_a_vm_image_is_one_more_layer_with_the_kernel_and_busybox_and_keeps_the_profile_name() -> None:
    standard = load_profile("standard")
    vm = with_vm(standard)
    assert vm.name == "standard" and vm.parent == standard and vm.packages == VM_PACKAGES and vm.vm
    assert vm.is_vm and not standard.is_vm and not any(layer.vm for layer in standard.chain())
    assert with_vm(vm) is vm  # already a VM image: the same one
    more = with_packages(vm, ["htop"])
    assert more.is_vm and with_vm(more) is more  # a layer above the VM layer keeps it a VM image
    assert [layer.vm for layer in with_vm(with_packages(standard, ["htop"])).chain()] == [False, False, False, True]


def test_a_vm_layer_has_its_own_recipe_and_image_name_and_both_are_stable() -> None:
    standard = load_profile("standard")
    vm = with_vm(standard)
    assert builder.recipe_hash(vm) == builder.recipe_hash(with_vm(load_profile("standard")))
    assert builder.recipe_hash(vm) != builder.recipe_hash(standard)
    # the VM mark itself is in the recipe: the same packages without it do not prune the kernel's modules
    plain = Profile("standard", parent=standard, packages=VM_PACKAGES)
    assert builder.recipe_hash(plain) != builder.recipe_hash(vm)
    files = builder.image_files(vm)
    assert builder.files_hash(files) == builder.files_hash(builder.image_files(standard))  # same agent and session
    name = builder.image_filename(vm, files)
    assert name == f"deckard-standard-vm-{builder.recipe_hash(vm)}-{builder.files_hash(files)}.tar.zst"
    assert name == builder.image_filename(with_vm(load_profile("standard")))
    assert name != builder.image_filename(standard, files)
    longest = with_vm(Profile("a" * 20, parent=standard))
    assert len(builder.image_filename(longest, files).split(".")[0]) <= 64  # the image's version in the database


def test_image_json_says_which_formats_an_image_serves_and_a_vm_image_its_kernel() -> None:
    minimal = load_profile("minimal")
    files = builder.image_files(minimal)
    container = builder.image_metadata(minimal, files)
    assert container["formats"] == ["container"] and "kernel" not in container
    vm = builder.image_metadata(with_vm(minimal), files, "6.1.0-28-amd64")
    assert vm["formats"] == ["container", "vm"] and vm["kernel"] == "6.1.0-28-amd64"
    assert vm["profile"] == "minimal" and {"linux-image-amd64", "busybox-static"} <= set(vm["packages"])


# ---- the image file's format -----------------------------------------------------------------------------
def test_an_image_is_the_cached_rootfs_plus_our_files_and_says_its_profile(tmp_path: Path) -> None:
    """The rootfs frames are copied, not recompressed; our files come after and replace the rootfs's."""
    rootfs = tmp_path / "rootfs"
    write(rootfs / "etc/jwm/system.jwmrc", "from the package\n")
    write(rootfs / "etc/os-release", "debian\n")
    plain = tmp_path / "rootfs.tar"
    subprocess.run(["tar", "--numeric-owner", "-b1", "-C", str(rootfs), "-cf", str(plain), "."], check=True)
    builder._drop_tar_end(plain)
    cached = tmp_path / "rootfs.tar.zst"
    subprocess.run(["zstd", "-q", "--rm", str(plain), "-o", str(cached)], check=True)

    minimal = load_profile("minimal")
    files = builder.image_files(minimal)
    image = tmp_path / "out" / builder.image_filename(minimal, files)
    image.parent.mkdir()
    meta = builder.image_metadata(minimal, files)
    asyncio.run(builder._pack_image(cached, image, files, meta, lambda _t, _f: None))

    assert builder.read_image_metadata(image) == meta and meta["profile"] == "minimal"
    out = tmp_path / "unpacked"
    out.mkdir()
    subprocess.run(["tar", "--numeric-owner", "-xf", str(image), "-C", str(out)], check=True)  # one plain tar -x
    assert (out / "etc/os-release").read_text() == "debian\n"
    assert b"<JWM>" in (out / "etc/jwm/system.jwmrc").read_bytes()  # ours replaced the package's
    assert (out / AGENT_PATH).stat().st_mode & 0o777 == 0o755
    assert json.loads((out / "etc/deckard/image.json").read_text())["profile"] == "minimal"


def test_the_files_archive_is_owned_by_root(tmp_path: Path) -> None:
    data = builder._files_tar([ImageFile("etc/x", b"x", 0o600)], {"profile": "p"})
    (tmp_path / "f.tar").write_bytes(data)
    with tarfile.open(tmp_path / "f.tar") as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert set(members) == {"./etc/deckard", "./etc/x", "./etc/deckard/image.json"}
    assert all(m.uid == 0 and m.gid == 0 for m in members.values())
    assert members["./etc/x"].mode == 0o600 and members["./etc/deckard"].isdir()


def test_other_tarballs_have_no_metadata(tmp_path: Path) -> None:
    for content in (b"", b"x" * 100, b"\x28\xb5\x2f\xfd" + b"\0" * 64):
        path = tmp_path / "other.tar.zst"
        path.write_bytes(content)
        assert builder.read_image_metadata(path) is None
    assert builder.read_image_metadata(tmp_path / "missing") is None
