"""``deckard.testing_cli.run_cli``, the farm tests' way to run the ``deckard`` command, gives what a process of its
own gives: the same output, errors and exit codes as ``python -m deckard.cli.main``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from deckard.testing_cli import _server_for, run_cli


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],  # 0, the whole command tree on stdout
        ["desktop", "bogus"],  # 2, Click's usage error on stderr
        ["desktop", "list", "--json"],  # 1, our error: no profile
    ],
)
def test_a_forked_command_answers_like_its_own_process(
    args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DECKARD_TEST_CLI_FORK", "1")
    env = dict(os.environ, NO_COLOR="1", COLUMNS="200", DECKARD_PROFILE=str(tmp_path / "none.json"))
    assert _server_for(env) is not None  # forked, not spawned
    forked = run_cli(args, env, timeout=60)
    spawned = subprocess.run(
        [sys.executable, "-m", "deckard.cli.main", *args], env=env, text=True, capture_output=True, timeout=60
    )
    assert (forked.returncode, forked.stdout, forked.stderr) == (spawned.returncode, spawned.stdout, spawned.stderr)
    assert forked.stdout or forked.stderr
