"""Printing to a QVD client's printers: the CUPS backend ``deckard-nx`` (QVD's "slave4" printing flavour).

A QVD client that asks for printing (``qvd.client.printing.enabled``) serves its printers on the NX slave
channel: ``GET /printer`` lists them (``{"Printers": [{"qvd_id", "name", "duplex", "color"}]}``) and
``POST /printer/<qvd_id>/printjob`` takes a document (``Content-Length`` bytes; ``102 Processing`` while the
client queues it, then ``200``).  Inside the desktop nxagent offers that channel on ``127.0.0.1:11100`` while the
client is attached.  The agent (``vma/agent.py`` ``ClientPrinters``) makes one CUPS queue per client printer,
``QVD-<qvd_id>``, whose device is ``deckard-nx:/<qvd_id>`` and whose PPD (:func:`ppd`) has CUPS turn every job
into PDF; CUPS then runs this file as the backend: the PDF goes to the client, which prints it on its printer.

Standard library only; the image carries it as :data:`BACKEND` (``images/builder.py``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from typing import Any, BinaryIO

BACKEND = "/usr/lib/cups/backend/deckard-nx"
SCHEME = "deckard-nx"
SLAVE_ADDRESS = ("127.0.0.1", 11100)  # nxagent's slave listener (10000 + 1000 + display 100)
QVD_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_HEAD = 8192
MAX_PRINTERS = 32
CONNECT_TRIES = 5
# CUPS backend exit codes
OK, FAILED, RETRY = 0, 1, 6


class PrintError(Exception):
    pass


def connect(timeout: float = 30.0) -> socket.socket:
    """A new slave connection to the client (the listener is there only while the client is attached)."""
    for attempt in range(CONNECT_TRIES):
        try:
            sock = socket.create_connection(SLAVE_ADDRESS, 5)
            sock.settimeout(timeout)
            return sock
        except OSError as exc:
            if attempt == CONNECT_TRIES - 1:
                raise PrintError(f"no QVD client is attached to this desktop ({exc.strerror or exc})") from None
            time.sleep(1)
    raise AssertionError("unreachable")


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response: the status, the headers (lower-case names) and its body (``Content-Length`` bytes)."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        if not byte:
            raise PrintError("the client closed the slave connection")
        head += byte
        if len(head) > MAX_HEAD:
            raise PrintError("the client's answer is too long")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise PrintError(f"the client answered {lines[0][:60]!r}")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = b""
    length = int(headers.get("content-length", "0") or 0)
    while len(body) < length:
        chunk = sock.recv(min(65536, length - len(body)))
        if not chunk:
            raise PrintError("the client closed the slave connection mid-answer")
        body += chunk
    return int(parts[1]), headers, body


def final_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """The first answer that is not ``102 Processing``."""
    while True:
        status, headers, body = read_response(sock)
        if status != 102:
            return status, headers, body


def client_printers() -> list[dict[str, Any]]:
    """The client's printers (``GET /printer``), each checked: a ``qvd_id`` fit for a queue name, a name."""
    with connect(10) as sock:
        sock.sendall(b"GET /printer HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n")
        status, _headers, body = final_response(sock)
    if status != 200:
        raise PrintError(f"the client answered {status} to GET /printer")
    try:
        listed = json.loads(body)["Printers"]
    except (ValueError, KeyError, TypeError):
        raise PrintError("the client's printer list is not QVD's JSON") from None
    printers = []
    for item in listed[:MAX_PRINTERS] if isinstance(listed, list) else []:
        if not isinstance(item, dict) or not QVD_ID_RE.fullmatch(str(item.get("qvd_id", ""))):
            continue
        qvd_id = str(item["qvd_id"])
        name = re.sub(r"[^\w .()+-]", "", str(item.get("name") or qvd_id))[:64] or qvd_id  # goes into the PPD
        duplex, color = bool(item.get("duplex")), bool(item.get("color"))
        printers.append({"qvd_id": qvd_id, "name": name, "duplex": duplex, "color": color})
    return printers


def ppd(name: str, *, duplex: bool, color: bool) -> str:
    """A PPD for a client printer: CUPS converts each job to PDF (``application/vnd.cups-pdf``) for this backend."""
    lines = [
        '*PPD-Adobe: "4.3"',
        '*FormatVersion: "4.3"',
        '*FileVersion: "1.0"',
        "*LanguageVersion: English",
        "*LanguageEncoding: ISOLatin1",
        '*PCFileName: "DECKARDNX.PPD"',
        '*Manufacturer: "QVD client"',
        '*Product: "(Deckard NX printer)"',
        '*ModelName: "Deckard NX printer"',
        f'*ShortNickName: "{name}"',
        f'*NickName: "{name} (QVD client)"',
        '*PSVersion: "(3010.000) 0"',
        '*LanguageLevel: "3"',
        f"*ColorDevice: {'True' if color else 'False'}",
        f"*DefaultColorSpace: {'RGB' if color else 'Gray'}",
        "*FileSystem: False",
        '*cupsFilter: "application/vnd.cups-pdf 0 -"',
        "*OpenUI *PageSize/Media Size: PickOne",
        "*OrderDependency: 10 AnySetup *PageSize",
        "*DefaultPageSize: A4",
        '*PageSize A4/A4: "<</PageSize[595 842]>>setpagedevice"',
        '*PageSize Letter/US Letter: "<</PageSize[612 792]>>setpagedevice"',
        "*CloseUI: *PageSize",
        "*OpenUI *PageRegion: PickOne",
        "*OrderDependency: 10 AnySetup *PageRegion",
        "*DefaultPageRegion: A4",
        '*PageRegion A4/A4: "<</PageSize[595 842]>>setpagedevice"',
        '*PageRegion Letter/US Letter: "<</PageSize[612 792]>>setpagedevice"',
        "*CloseUI: *PageRegion",
        "*DefaultImageableArea: A4",
        '*ImageableArea A4/A4: "0 0 595 842"',
        '*ImageableArea Letter/US Letter: "0 0 612 792"',
        "*DefaultPaperDimension: A4",
        '*PaperDimension A4/A4: "595 842"',
        '*PaperDimension Letter/US Letter: "612 792"',
    ]
    if duplex:
        lines += [
            "*OpenUI *Duplex/2-Sided Printing: PickOne",
            "*OrderDependency: 25 AnySetup *Duplex",
            "*DefaultDuplex: None",
            '*Duplex None/Off: "<</Duplex false>>setpagedevice"',
            '*Duplex DuplexNoTumble/Long Edge: "<</Duplex true/Tumble false>>setpagedevice"',
            '*Duplex DuplexTumble/Short Edge: "<</Duplex true/Tumble true>>setpagedevice"',
            "*CloseUI: *Duplex",
        ]
    return "\n".join(lines) + "\n"


def send_job(qvd_id: str, document: BinaryIO, size: int) -> str:
    """``POST /printer/<qvd_id>/printjob`` with the document; returns the client's final answer's text."""
    with connect() as sock:
        head = f"POST /printer/{qvd_id}/printjob HTTP/1.1\r\nHost: localhost\r\n"
        head += f"Content-Type: application/pdf\r\nContent-Length: {size}\r\n\r\n"
        sock.sendall(head.encode())
        while chunk := document.read(65536):
            sock.sendall(chunk)
        status, _headers, body = final_response(sock)
    if status != 200:
        raise PrintError(f"the client refused the job ({status}): {body.decode(errors='replace')[:200]}")
    return body.decode(errors="replace")[:200]


def main(argv: list[str]) -> int:
    if len(argv) == 1:  # CUPS lists its backends' devices: ours are made by the agent, not discovered
        print(f'direct {SCHEME} "Unknown" "Printer of the QVD client (NX)"')
        return OK
    if len(argv) not in (6, 7):
        print("Usage: deckard-nx job-id user title copies options [file]", file=sys.stderr)
        return FAILED
    uri = os.environ.get("DEVICE_URI", "")
    qvd_id = uri.split(":", 1)[1].lstrip("/") if uri.startswith(f"{SCHEME}:") else ""
    if not QVD_ID_RE.fullmatch(qvd_id):
        print(f"ERROR: {uri!r} is not a deckard-nx:/<printer> device", file=sys.stderr)
        return FAILED
    try:
        if len(argv) == 7:
            with open(argv[6], "rb") as document:
                answer = send_job(qvd_id, document, os.fstat(document.fileno()).st_size)
        else:  # the job on standard input: spooled first, its length goes before it
            with tempfile.TemporaryFile(dir=os.environ.get("TMPDIR")) as spool:
                shutil.copyfileobj(sys.stdin.buffer, spool)
                size = spool.tell()
                spool.seek(0)
                answer = send_job(qvd_id, spool, size)
    except PrintError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return RETRY if "no QVD client" in str(exc) else FAILED
    except OSError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return FAILED
    print(f"INFO: sent to the QVD client's printer {qvd_id} ({answer})", file=sys.stderr)
    return OK


if __name__ == "__main__":
    sys.exit(main(sys.argv))
