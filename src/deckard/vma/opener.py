"""``deckard-open PROGRAM [ARGUMENT...]``: start a program of the desktop's user from its shell's menu.

An image's menus start their programs through this (``images/profiles/minimal/system.jwmrc``).  Run by the user
(their own window manager: a cold start), it is the program itself (``exec``).  Run by a warm guest's shell, which
draws the desktop as ``nobody`` before its user is known (``vma/agent.py`` SHELL_SCRIPT), it asks the agent, over
its unix socket, to start the program as the user who took the guest over (``XSession.launch``).

Installed in an image as ``/usr/local/bin/deckard-open`` (``images/builder.py``): the standard library only.
"""

from __future__ import annotations

import json
import os
import pwd
import socket
import sys

LAUNCH_SOCKET = "/run/deckard/launch.sock"  # vma/agent.py LAUNCH_SOCKET
SHELL_USER = "nobody"  # vma/agent.py WARM_DISPLAY_USER: whose requests go to the agent


def ask_agent(argv: list[str], path: str = LAUNCH_SOCKET) -> str:
    """The agent's answer to starting ``argv`` as the display's user: ``ok`` or ``error <code>: <message>``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10.0)
        sock.connect(path)
        sock.sendall(json.dumps(argv).encode() + b"\n")
        with sock.makefile("rb") as answer:
            return answer.readline(4096).decode(errors="replace").strip()


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: deckard-open PROGRAM [ARGUMENT...]", file=sys.stderr)
        return 2
    try:
        shell_uid = pwd.getpwnam(SHELL_USER).pw_uid
    except KeyError:
        shell_uid = -1
    if os.getuid() != shell_uid:  # the user's own shell: the program is theirs already
        try:
            os.execvp(argv[0], argv)
        except OSError as exc:
            print(f"deckard-open: {argv[0]}: {exc.strerror}", file=sys.stderr)
            return 127
    try:
        answer = ask_agent(argv)
    except OSError as exc:
        print(f"deckard-open: the desktop's agent did not answer: {exc}", file=sys.stderr)
        return 1
    if answer != "ok":
        print(f"deckard-open: {answer or 'no answer from the agent'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
