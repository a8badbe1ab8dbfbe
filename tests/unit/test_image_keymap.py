"""The image's ``xkbcomp`` wrapper (images/keymap.py), run by the host's ``/bin/sh`` against a fake real compiler
that records what it was given: Xvnc's start-up keymap is copied from the cache, anything else is compiled."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from deckard.images import keymap

KEYMAP = """xkb_keymap "default" {
    xkb_keycodes             { include "evdev+aliases(qwerty)" };
    xkb_symbols              { include "pc+us+inet(evdev)" };
};
"""


@pytest.fixture
def tools(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(the wrapper, the cache directory, where the fake compiler writes its arguments and stdin)."""
    cache, calls = tmp_path / "cache", tmp_path / "calls"
    cache.mkdir()
    calls.mkdir()
    (cache / "default.xkb").write_text(KEYMAP)
    (cache / "default.xkm").write_bytes(b"\x00compiled\xff")
    real = tmp_path / "xkbcomp.real"
    real.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" >{calls}/args\ncat >{calls}/stdin\n')
    real.chmod(0o755)
    wrapper = tmp_path / "xkbcomp"
    wrapper.write_text(keymap.wrapper(str(cache), str(real)))
    wrapper.chmod(0o755)
    return wrapper, cache, calls


def xvnc_args(out: Path) -> list[str]:
    """Xvnc's command line for xkbcomp (xkb/ddxLoad.c)."""
    return ["-w", "1", f"-R{keymap.XKB_ROOT}", "-xkm", "-", "-em1", "M1", "-emp", "> ", "-eml", "M2", str(out)]


def test_xvncs_start_up_keymap_is_the_compiled_file_and_nothing_is_compiled(
    tools: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    wrapper, _cache, calls = tools
    out = tmp_path / "server-0.xkm"
    done = subprocess.run([wrapper, *xvnc_args(out)], input=KEYMAP, capture_output=True, text=True, check=True)
    assert out.read_bytes() == b"\x00compiled\xff"
    assert not (calls / "args").exists() and done.stderr == ""


def test_another_keymap_is_compiled_from_the_same_input_and_the_miss_is_said(
    tools: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    wrapper, _cache, calls = tools
    other = KEYMAP.replace("pc+us", "pc+es") + "  // no newline at the end"
    out = tmp_path / "server-0.xkm"
    done = subprocess.run([wrapper, *xvnc_args(out)], input=other, capture_output=True, text=True, check=True)
    assert (calls / "args").read_text().splitlines() == xvnc_args(out)
    assert (calls / "stdin").read_text() == other + "\n"  # a last line gets its newline: the same to xkbcomp
    assert keymap.MISS in done.stderr and not out.exists()


def test_other_uses_of_xkbcomp_reach_the_compiler_untouched(tools: tuple[Path, Path, Path]) -> None:
    """``setxkbmap`` pipes a keymap to ``xkbcomp - $DISPLAY``; a cache never answers it."""
    wrapper, _cache, calls = tools
    args = ["-w", "1", "-I/usr/share/X11/xkb", "-", ":0"]
    subprocess.run([wrapper, *args], input=KEYMAP, capture_output=True, text=True, check=True)
    assert (calls / "args").read_text().splitlines() == args
    assert (calls / "stdin").read_text() == KEYMAP


def test_without_a_cache_xvnc_gets_the_compiler(tools: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """An image whose builder could not learn the keymap has the wrapper without a cache."""
    wrapper, cache, calls = tools
    (cache / "default.xkm").unlink()
    out = tmp_path / "server-0.xkm"
    done = subprocess.run([wrapper, *xvnc_args(out)], input=KEYMAP, capture_output=True, text=True, check=True)
    assert (calls / "stdin").read_text() == KEYMAP and done.stderr == ""
