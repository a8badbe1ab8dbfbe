"""A container's boot script (``drivers/agent_code.boot_script``) and the agent's adoption of the Xvnc it starts.

The script runs as a desktop's init (the e2e tests boot every container with it); here: that it is valid ``sh``,
starts the display with the agent's own command line and environment, and hands Xvnc's pid to the agent.
"""

from __future__ import annotations

import shlex
import signal
import subprocess

from deckard.drivers.agent_code import AGENT_PYC_COMMAND, boot_script
from deckard.vma import agent as vma


def test_the_boot_script_is_valid_sh_and_starts_the_agents_display_then_the_agent() -> None:
    script = boot_script(AGENT_PYC_COMMAND)
    assert subprocess.run(["sh", "-n"], input=script.encode(), check=False).returncode == 0
    xvnc = vma.xvnc_args(vma.DISPLAY, vma.DEFAULT_GEOMETRY, f"{vma.RUN_DIR}/display-passwd", software_cpu=False)
    assert shlex.join(xvnc) in script
    assert 'setsid setpriv --reuid="$uid" --regid="$uid" --clear-groups env -i ' in script
    account = vma.pwd.struct_passwd(("$login", "x", 0, 0, "", "/home/$login", "/bin/bash"))
    for key, value in vma.user_env(account).items():  # the environment the agent gives Xvnc, for this login
        assert f'{key}="{value}"' in script
    assert f'install -m 600 -o "$uid" -g "$uid" {vma.DISPLAY_SECRET_FILE} {vma.RUN_DIR}/display-passwd' in script
    assert script.rstrip().endswith(f'exec {AGENT_PYC_COMMAND} --display-for "$login:$uid" $xvnc')


def test_an_adopted_child_is_polled_signalled_and_reaped_like_a_spawned_one() -> None:
    spawned = subprocess.Popen(["sleep", "30"], start_new_session=True)  # stands for the boot script's Xvnc
    children = vma.Children()
    adopted = children.adopt(spawned.pid, "Xvnc")
    try:
        assert adopted.poll() is None and vma._alive(adopted)
        assert repr(adopted).startswith("<Adopted")
        vma.os.killpg(adopted.pid, signal.SIGTERM)
        assert adopted.wait(timeout=10) == -signal.SIGTERM
        assert not vma._alive(adopted)
        children.forget(adopted)
        spawned.returncode = adopted.returncode  # reaped through the adoption
    finally:
        if adopted.returncode is None:
            spawned.kill()
            spawned.wait()
