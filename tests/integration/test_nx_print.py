"""The desktop's CUPS backend for a QVD client's printers (vma/nx_print.py) against QVD's client slave server as
the tests stand it in (testing_nx._CLIENT_SLAVE), on loopback: nxagent's slave port is replaced by a listener
that runs that server for each connection, as nxproxy does."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from deckard.testing_nx import _CLIENT_SLAVE
from deckard.vma import nx_print

PRINTERS = [
    {"qvd_id": "laser1", "name": "Office Laser", "duplex": True, "color": False},
    {"qvd_id": "../etc", "name": "bad id"},  # never a queue name
    {"qvd_id": "inkjet", "name": 'Ink"jet\n*cupsFilter: evil', "color": True},
]


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    out = tmp_path / "printed"
    out.mkdir()
    script = tmp_path / "client-slave"
    script.write_text(_CLIENT_SLAVE.format(python=sys.executable, printers=json.dumps(PRINTERS), out=str(out)))
    script.chmod(0o700)
    server = socket.create_server(("127.0.0.1", 0))
    monkeypatch.setattr(nx_print, "SLAVE_ADDRESS", server.getsockname())

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                subprocess.run([str(script)], stdin=conn, stdout=conn, timeout=10, check=False)

    threading.Thread(target=serve, daemon=True).start()
    yield out
    server.close()


@pytest.mark.usefixtures("client")
def test_the_clients_printers_are_listed_checked() -> None:
    printers = nx_print.client_printers()
    assert [p["qvd_id"] for p in printers] == ["laser1", "inkjet"]
    assert printers[0] == {"qvd_id": "laser1", "name": "Office Laser", "duplex": True, "color": False}
    assert printers[1]["name"] == "InkjetcupsFilter evil"  # nothing that could end its quotes or add a PPD line
    ppd = nx_print.ppd(printers[0]["name"], duplex=True, color=False)
    assert '*cupsFilter: "application/vnd.cups-pdf 0 -"' in ppd and "*OpenUI *Duplex" in ppd
    assert "*OpenUI *Duplex" not in nx_print.ppd("x", duplex=False, color=True)


def test_a_job_reaches_the_client_from_a_file_or_standard_input(
    client: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = tmp_path / "job.pdf"
    job.write_bytes(b"%PDF-1.4 a document\n" * 1000)
    monkeypatch.setenv("DEVICE_URI", "deckard-nx:/laser1")
    assert nx_print.main(["deckard-nx", "7", "pia", "title", "1", "", str(job)]) == nx_print.OK
    monkeypatch.setattr(sys, "stdin", open(job))  # noqa: SIM115 (a text stream with its .buffer, as CUPS gives)
    assert nx_print.main(["deckard-nx", "8", "pia", "title", "1", ""]) == nx_print.OK
    printed = sorted(client.glob("laser1-*.pdf"))
    assert [p.read_bytes() for p in printed] == [job.read_bytes()] * 2


def test_bad_devices_and_refusals_fail_the_job(client: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job = tmp_path / "job.pdf"
    job.write_bytes(b"%PDF")
    for uri in ("deckard-nx:/../etc", "ipp://elsewhere/x", ""):
        monkeypatch.setenv("DEVICE_URI", uri)
        assert nx_print.main(["deckard-nx", "1", "u", "t", "1", "", str(job)]) == nx_print.FAILED
    monkeypatch.setenv("DEVICE_URI", "deckard-nx:/unknown")  # the client answers 404
    assert nx_print.main(["deckard-nx", "1", "u", "t", "1", "", str(job)]) == nx_print.FAILED
    assert list(client.iterdir()) == []


def test_no_client_attached_asks_cups_to_retry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    closed = socket.create_server(("127.0.0.1", 0))
    address = closed.getsockname()
    closed.close()
    monkeypatch.setattr(nx_print, "SLAVE_ADDRESS", address)
    monkeypatch.setattr(nx_print, "CONNECT_TRIES", 1)
    monkeypatch.setenv("DEVICE_URI", "deckard-nx:/laser1")
    job = tmp_path / "job.pdf"
    job.write_bytes(b"%PDF")
    assert nx_print.main(["deckard-nx", "1", "u", "t", "1", "", str(job)]) == nx_print.RETRY
    assert nx_print.main(["deckard-nx"]) == nx_print.OK  # CUPS's device listing
