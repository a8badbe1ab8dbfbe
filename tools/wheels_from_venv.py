"""Pack the pinned distributions installed in a virtualenv back into wheels: a wheelhouse without a network.

``make wheelhouse`` downloads the pins of ``requirements.lock`` while a package index is reachable.  A machine
that has a working ``.venv`` but no network (an air-gapped farm, or one whose network went away) can make the
same wheelhouse from what is installed, so that a second clone, CI's, installs with ``pip --no-index``::

    .venv/bin/python tools/wheels_from_venv.py .venv/lib/python3.11/site-packages /var/cache/deckard/wheels \\
        requirements.lock

Each wheel holds the files the distribution's ``RECORD`` lists (bytecode left out), its metadata and a new
``RECORD``; scripts pip generated from entry points are left for pip to generate again, other scripts keep their
contents with a ``#!python`` line.  The build backend (setuptools) is not in the venv: copy its wheel beside them.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import re
import sys
import zipfile
from importlib.metadata import Distribution, distributions
from pathlib import Path

SKIPPED_METADATA = ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")
SCRIPTS = "../../../bin/"
DATA = "../../../"


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(lock: Path) -> dict[str, str]:
    """name → version of every ``name==version`` line."""
    out = {}
    for line in lock.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out[normal(name)] = version.strip()
    return out


def _digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def wheel_name(dist: Distribution, info: Path) -> str:
    """``name-version-python-abi-platform.whl`` from the tags the installed ``WHEEL`` file lists."""
    lines = (info / "WHEEL").read_text().splitlines()
    tags = [line.split(":", 1)[1].strip() for line in lines if line.startswith("Tag:")]
    parts = [".".join(dict.fromkeys(tag.split("-")[i] for tag in tags)) for i in range(3)]
    return f"{re.sub(r'[-_.]+', '_', dist.metadata['Name'])}-{dist.version}-{'-'.join(parts)}.whl"


def pack(dist: Distribution, site: Path, out: Path) -> Path:
    """One installed distribution as a wheel in ``out``."""
    info = Path(str(dist._path))  # type: ignore[attr-defined]
    name = re.sub(r"[-_.]+", "_", dist.metadata["Name"])
    data_dir = f"{name}-{dist.version}.data"
    generated = {ep.name for ep in dist.entry_points if ep.group in ("console_scripts", "gui_scripts")}
    files: list[tuple[str, bytes, int]] = []
    for row in csv.reader(io.StringIO((info / "RECORD").read_text())):
        rel = row[0]
        if rel.endswith(".pyc") or "__pycache__" in rel:
            continue
        if rel.startswith(info.name + "/") and rel.split("/", 1)[1] in SKIPPED_METADATA:
            continue
        source = (site / rel).resolve()
        if rel.startswith(SCRIPTS):
            script = rel[len(SCRIPTS) :]
            if script in generated:
                continue
            content = source.read_bytes()
            first, _, rest = content.partition(b"\n")
            if first.startswith(b"#!") and b"python" in first:
                content = b"#!python\n" + rest
            files.append((f"{data_dir}/scripts/{script}", content, source.stat().st_mode))
        elif rel.startswith(DATA):
            files.append((f"{data_dir}/data/{rel[len(DATA) :]}", source.read_bytes(), source.stat().st_mode))
        elif not rel.startswith(".."):
            files.append((rel, source.read_bytes(), source.stat().st_mode))
    target = out / wheel_name(dist, info)
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as whl:
        for rel, content, mode in files:
            entry = zipfile.ZipInfo(rel, (2020, 1, 1, 0, 0, 0))
            entry.external_attr = (mode & 0xFFFF) << 16
            entry.compress_type = zipfile.ZIP_DEFLATED
            whl.writestr(entry, content)
            writer.writerow([rel, _digest(content), len(content)])
        writer.writerow([f"{info.name}/RECORD", "", ""])
        whl.writestr(f"{info.name}/RECORD", record.getvalue())
    return target


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    site, out, lock = Path(argv[0]), Path(argv[1]), Path(argv[2])
    out.mkdir(parents=True, exist_ok=True)
    installed = {normal(d.metadata["Name"]): d for d in distributions(path=[str(site)])}
    missing = []
    for name, version in sorted(pins(lock).items()):
        dist = installed.get(name)
        if dist is None or dist.version != version:
            missing.append(f"{name}=={version}")
            continue
        print(pack(dist, site, out).name)
    if missing:
        print(f"not installed at the pinned version: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
