"""tools/wheels_from_venv.py: an installed distribution packed back into a wheel that pip installs again."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import subprocess
import sys
import sysconfig
import zipfile
from importlib.metadata import distribution
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import wheels_from_venv


def test_a_packed_distribution_has_a_true_record_and_installs_with_pip(tmp_path: Path) -> None:
    site = Path(sysconfig.get_path("purelib"))
    dist = distribution("iniconfig")  # small, pure Python, pinned in requirements.lock
    wheel = wheels_from_venv.pack(dist, site, tmp_path)
    assert wheel.name == f"iniconfig-{dist.version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        record_name = next(n for n in names if n.endswith(".dist-info/RECORD"))
        rows = list(csv.reader(io.StringIO(whl.read(record_name).decode())))
        for path, digest, size in rows:
            if path == record_name:
                continue
            data = whl.read(path)
            assert digest == "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert int(size) == len(data)
        assert {r[0] for r in rows} == names
        assert not any(n.endswith((".pyc", "INSTALLER", "direct_url.json")) for n in names)
    target = tmp_path / "installed"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(target), str(wheel)]
    subprocess.run(pip, check=True, capture_output=True)
    found = subprocess.run(
        [sys.executable, "-c", "import iniconfig, sys; print(iniconfig.__file__)"],
        env={"PYTHONPATH": str(target)},
        check=True,
        capture_output=True,
        text=True,
    )
    assert found.stdout.startswith(str(target))


def test_pins_are_read_from_the_lock(tmp_path: Path) -> None:
    lock = tmp_path / "requirements.lock"
    lock.write_text("# pins\nPyYAML==6.0.4\nqemu.qmp==0.0.6  # a comment\n\n")
    assert wheels_from_venv.pins(lock) == {"pyyaml": "6.0.4", "qemu-qmp": "0.0.6"}
