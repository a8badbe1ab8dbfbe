"""The standard desktop's printer and sound in a real farm, one desktop start in all (the broker starts it, as a
connect does).

Printing: the agent starts cupsd and makes the ``PDF`` queue the default, and what the user prints (``lp``, as a
Print dialog would submit it) becomes a PDF of theirs in ``~/PDF``, one per job, while cupsd offers nothing to the
network.

Sound: the agent runs a PulseAudio as the user (no network module, its socket in the user's runtime directory); a
440 Hz tone played in the desktop reaches the portal's page in Chromium through the broker's ``/ws/sound`` and the
page's Web Audio analyser finds it; the capture ends with the page.  The same tone reaches a QVD client's
PulseAudio through nxproxy's media channel.
"""

from __future__ import annotations

import asyncio
import hashlib
import shlex
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deckard.client import broker as qvd
from deckard.client.rfb import grab_framebuffer
from deckard.testing import FarmProcess, goto, wait_for
from deckard.testing_nx import ClientSound, NxViewer, dominant_frequency, nx_unavailable_reason, run_in_thread
from deckard.vma.agent import pick_pdf_model
from deckard.vma.sound import FRAME_MS

SHARED_FARM = True  # tests/e2e/conftest.py: users and desktops of its own names, no farm-wide change kept
LOGIN = "pia"
PASSWORD = "print-desktop-pw"
TEXT = "Deckard print test 4711"
PDF_WAIT_S = 30

# Run inside the desktop: the TCP and UDP sockets cupsd holds, and every port anyone listens on (LISTEN, 0A).
SOCKETS_OF_CUPSD = r"""
import os
pid = next(p for p in os.listdir("/proc") if p.isdigit() and open(f"/proc/{p}/comm").read().strip() == "cupsd")
inodes = {os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] for fd in os.listdir(f"/proc/{pid}/fd")
          if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:[")}
held, listening = [], set()
for table in ("tcp", "tcp6", "udp", "udp6"):
    for line in open(f"/proc/net/{table}").readlines()[1:]:
        fields = line.split()
        if fields[9] in inodes:
            held.append(f"{table} {fields[1]}")
        if table.startswith("tcp") and fields[3] == "0A":
            listening.add(int(fields[1].rsplit(":", 1)[1], 16))
print("held:", *held)
print("listening:", *sorted(listening))
"""


async def connect_once(farm: FarmProcess, desktop_id: int) -> None:
    """Start the desktop through the broker, as a client's connect does, and take its first framebuffer."""
    reader, writer = await qvd.connect(farm.broker, LOGIN, PASSWORD, farm.ca, desktop_id)
    try:
        await asyncio.wait_for(grab_framebuffer(reader, writer), 60)
    finally:
        writer.close()


@pytest.fixture(scope="module")
def desktop(farm: FarmProcess, standard_image: Path) -> Iterator[int]:
    """A running standard desktop of a new user, whose PDF queue is up (its sound server starts with its display)."""
    farm.deckard("image", "import", str(standard_image), "--tag", "standard")  # idempotent: same file, same tag
    farm.deckard("user", "add", LOGIN, "--password", PASSWORD)
    farm.deckard("desktop", "add", f"{LOGIN}-print", "--user", LOGIN, "--tag", "standard")
    desktop_id = int(farm.desktop(f"{LOGIN}-print")["id"])
    try:
        asyncio.run(connect_once(farm, desktop_id))
        wait_for(lambda: farm.attach(desktop_id, "lpstat -d").stdout.strip().endswith(": PDF"), 30, 0.3, "queue")
        yield desktop_id
    except BaseException:
        print(farm.diagnostics(desktop_id))
        raise


def pdfs(farm: FarmProcess, desktop_id: int) -> list[str]:
    out = farm.attach(desktop_id, "ls -1 ~/PDF 2>/dev/null", user=LOGIN).stdout
    return [name for name in out.split() if name.endswith(".pdf")]


def wait_for_pdfs(farm: FarmProcess, desktop_id: int, count: int) -> list[str]:
    deadline = time.monotonic() + PDF_WAIT_S
    while len(found := pdfs(farm, desktop_id)) < count:
        if time.monotonic() > deadline:
            jobs = farm.attach(desktop_id, "lpstat -W all -o; lpstat -p PDF; tail -n 20 /run/deckard/*.log")
            raise AssertionError(f"{count} PDF(s) expected in ~/PDF after {PDF_WAIT_S} s, found {found}:\n{jobs}")
        time.sleep(0.3)
    return found


def test_what_the_user_prints_becomes_a_pdf_of_theirs_in_their_pdf_folder(farm: FarmProcess, desktop: int) -> None:
    listed = farm.attach(desktop, "lpstat -l -p PDF; lpstat -v PDF", user=LOGIN).stdout
    assert "Print to your browser (PDF)" in listed and "cups-pdf:/" in listed, listed

    submitted = farm.attach(desktop, f"printf '%s\\n' {shlex.quote(TEXT)} | lp", user=LOGIN)  # the default queue
    assert submitted.returncode == 0 and "request id is PDF-" in submitted.stdout, submitted
    (name,) = wait_for_pdfs(farm, desktop, 1)

    path = shlex.quote(f"PDF/{name}")
    owner = farm.attach(desktop, f"stat -c '%U %G %a' {path}; head -c 5 {path}; echo", user=LOGIN).stdout.split()
    assert owner == [LOGIN, LOGIN, "600", "%PDF-"], owner
    pages = farm.attach(desktop, f"pdfinfo {path} | grep '^Pages:'", user=LOGIN).stdout.split()
    assert pages == ["Pages:", "1"], pages
    # nothing is left behind in the spool, nor half-written in ~/PDF
    listing = f"{{ ls -A /var/spool/cups-pdf/{LOGIN}; ls -A ~/PDF; }} | grep -v '[.]pdf$'"
    leftovers = farm.attach(desktop, listing, user=LOGIN)
    assert leftovers.stdout.strip() == "", leftovers.stdout


def test_a_pdf_print_job_keeps_its_text(farm: FarmProcess, desktop: int) -> None:
    """What a Print dialog sends (GTK renders the document to PDF) comes out with its text searchable."""
    before = set(pdfs(farm, desktop))
    page = f"/Helvetica findfont 20 scalefont setfont 72 700 moveto ({TEXT}) show showpage"
    made = f"gs -q -sDEVICE=pdfwrite -o /tmp/letter.pdf -c {shlex.quote(page)} && lp -t letter /tmp/letter.pdf"
    job = farm.attach(desktop, made, user=LOGIN)
    assert job.returncode == 0, job
    (name,) = set(wait_for_pdfs(farm, desktop, len(before) + 1)) - before
    assert name.startswith("letter") and "-job_" in name, name
    text = farm.attach(desktop, f"pdftotext {shlex.quote('PDF/' + name)} -", user=LOGIN)
    assert TEXT in text.stdout, text


def test_a_job_printed_in_the_desktop_reaches_the_browser_as_that_pdf(
    farm: FarmProcess, desktop: int, browser: Any, tmp_path: Path
) -> None:
    """The portal's viewer announces the new print job; Save gives the very PDF, whose text is what was printed."""
    from playwright.sync_api import expect

    ctx = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 800})
    ctx.set_default_timeout(30_000)
    try:
        page = ctx.new_page()
        goto(page, f"https://127.0.0.1:{farm.api_port}/")
        page.get_by_label("User name").fill(LOGIN)
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Log in").click()
        page.get_by_role("button", name=f"Connect to {LOGIN}-print").click()
        page.wait_for_function("() => document.body.dataset.firstFrame", timeout=60_000)
        page.wait_for_timeout(2500)  # the page's first look at ~/PDF: jobs from before are not announced
        before = set(pdfs(farm, desktop))
        page_ps = f"/Helvetica findfont 20 scalefont setfont 72 700 moveto ({TEXT}) show showpage"
        made = f"gs -q -sDEVICE=pdfwrite -o /tmp/memo.pdf -c {shlex.quote(page_ps)} && lp -t memo /tmp/memo.pdf"
        assert farm.attach(desktop, made, user=LOGIN).returncode == 0
        (name,) = set(wait_for_pdfs(farm, desktop, len(before) + 1)) - before
        notice = page.locator(f"li.print-job[data-name='{name}']")
        expect(notice).to_contain_text(f"Printed: {name}")
        with page.expect_download() as download:
            notice.locator("button.print-save").click()
        saved = tmp_path / "printed.pdf"
        download.value.save_as(saved)
        in_desktop = farm.attach(desktop, f"sha256sum {shlex.quote('PDF/' + name)}", user=LOGIN).stdout.split()[0]
        assert hashlib.sha256(saved.read_bytes()).hexdigest() == in_desktop
        assert saved.read_bytes().startswith(b"%PDF-")
        text = farm.attach(desktop, f"pdftotext {shlex.quote('PDF/' + name)} -", user=LOGIN).stdout
        assert TEXT in text, text
        notice.locator("button.print-dismiss").click()
        expect(notice).to_have_count(0)
    finally:
        ctx.close()


def test_two_jobs_of_one_title_make_two_pdfs(farm: FarmProcess, desktop: int) -> None:
    before = set(pdfs(farm, desktop))
    for n in (1, 2):
        job = farm.attach(desktop, f"echo 'copy {n}' > /tmp/same.txt && lp -t report /tmp/same.txt", user=LOGIN)
        assert job.returncode == 0, job
    new = sorted(set(wait_for_pdfs(farm, desktop, len(before) + 2)) - before)
    assert len(new) == 2 and all(name.startswith("report") and "-job_" in name for name in new), new


def test_a_job_printed_in_the_desktop_reaches_a_qvd_clients_printer(farm: FarmProcess, desktop: int) -> None:
    """QVD's "slave4" printing: a client that asks for printing offers its printers on the NX slave channel; the
    desktop gets a queue for each (the default while the client is there), CUPS makes each job a PDF and the
    deckard-nx backend sends it to the client, which prints it; the queues go when the client goes."""
    reason = nx_unavailable_reason()
    if reason:
        pytest.skip(reason)
    printers = [{"qvd_id": "laser1", "name": "Office Laser", "duplex": True, "color": False}]

    def queues() -> str:
        return farm.attach(desktop, "lpstat -v; lpstat -d").stdout

    async def scenario() -> None:
        async with NxViewer(printers=printers) as viewer:
            params = {"qvd.client.link": "lan", "qvd.client.printing.enabled": "1"}
            await viewer.connect(farm.broker, farm.ca, LOGIN, PASSWORD, desktop, params)
            try:
                await asyncio.to_thread(wait_for, lambda: "QVD-laser1: deckard-nx:/laser1" in queues(), 30, 0.3)
            except AssertionError:
                logs = farm.attach(desktop, "tail -n 20 /run/deckard/*.log").stdout
                pytest.fail(f"no queue for the client's printer\n{queues()}\n{viewer.log()[-600:]}\n{logs}")
            assert queues().strip().endswith("system default destination: QVD-laser1")
            lp = f"printf '{TEXT}\\n' > /tmp/nx-job.txt && lp -d QVD-laser1 -t nx-job /tmp/nx-job.txt"
            assert (await asyncio.to_thread(farm.attach, desktop, lp, LOGIN)).returncode == 0
            printed = await asyncio.to_thread(
                wait_for, lambda: sorted(viewer.print_dir.glob("laser1-*.pdf")), PDF_WAIT_S, 0.3, "the client's job"
            )
            assert printed[0].read_bytes().startswith(b"%PDF-"), printed[0].read_bytes()[:40]  # type: ignore[index]
            await viewer.disconnect()

    run_in_thread(scenario)
    wait_for(lambda: "QVD-laser1" not in queues(), 20, 0.3, "the client's queue to go")
    assert queues().strip().endswith("system default destination: PDF")


def test_cupsd_listens_on_no_network_port(farm: FarmProcess, desktop: int) -> None:
    out = farm.attach(desktop, f"python3 -c {shlex.quote(SOCKETS_OF_CUPSD)}")
    assert out.returncode == 0, out
    lines = dict(line.split(":", 1) for line in out.stdout.splitlines())
    assert lines["held"].split() == [], out.stdout  # no TCP or UDP socket at all, listening or not
    assert 631 not in {int(p) for p in lines["listening"].split()}, out.stdout
    assert farm.attach(desktop, "test -S /run/cups/cups.sock").returncode == 0  # its unix socket only


def test_the_pdf_queue_takes_cups_pdfs_model_with_options() -> None:
    lpinfo = (
        "lsb/usr/cups-pdf/CUPS-PDF_noopt.ppd Generic CUPS-PDF Printer (no options)\n"
        "lsb/usr/cups-pdf/CUPS-PDF_opt.ppd Generic CUPS-PDF Printer (w/ options)\n"
        "everywhere IPP Everywhere\n"
    )
    assert pick_pdf_model(lpinfo) == "lsb/usr/cups-pdf/CUPS-PDF_opt.ppd"
    assert pick_pdf_model(lpinfo.splitlines()[0]) == "lsb/usr/cups-pdf/CUPS-PDF_noopt.ppd"
    assert pick_pdf_model("everywhere IPP Everywhere\n") is None


# Run as the user inside the desktop: a WAV of a sine at FREQ Hz, SECONDS long, played on the session's sound server.
TONE = r"""
import math, struct, sys, wave
freq, seconds, path = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
with wave.open(path, "wb") as w:
    w.setnchannels(2); w.setsampwidth(2); w.setframerate(48000)
    n = int(48000 * seconds)
    w.writeframes(b"".join(struct.pack("<hh", v, v) for v in
                           (int(12000 * math.sin(2 * math.pi * freq * i / 48000)) for i in range(n))))
"""
PULSE = "PULSE_SERVER=unix:/run/user/$(id -u)/pulse/native"
# the page's analyser: the frequency of its loudest bin and that bin's level (dB), the bin's width
PEAK = """() => {
  const a = window.deckardSound && window.deckardSound.analyser;
  if (!a) return null;
  const bins = new Float32Array(a.frequencyBinCount);
  a.getFloatFrequencyData(bins);
  let best = 0;
  for (let i = 1; i < bins.length; i++) if (bins[i] > bins[best]) best = i;
  const width = a.context.sampleRate / a.fftSize;
  return { hz: best * width, db: bins[best], width };
}"""


def test_the_sound_server_runs_as_the_user_with_no_network_module(farm: FarmProcess, desktop: int) -> None:
    ps = farm.attach(desktop, "ps -o user=,args= -C pulseaudio").stdout.strip()
    assert ps.startswith(f"{LOGIN} ") and "--disallow-module-loading" in ps, ps
    modules = farm.attach(desktop, f"{PULSE} pactl list short modules", user=LOGIN)
    assert modules.returncode == 0, modules
    names = {line.split()[1] for line in modules.stdout.splitlines()}
    # nothing that listens: the tunnel sink only dials nxagent's media channel on loopback (a QVD client's sound)
    expected = {"module-null-sink", "module-native-protocol-unix", "module-switch-on-connect"}
    assert names - {"module-tunnel-sink-new"} == expected, names
    sink = farm.attach(desktop, f"{PULSE} pactl get-default-sink", user=LOGIN).stdout.strip()
    assert sink == "deckard", sink  # no QVD client attached: the browser's sink
    mode = farm.attach(desktop, "stat -c '%U %a' /run/user/$(id -u)", user=LOGIN).stdout.split()
    assert mode == [LOGIN, "700"], mode


def test_a_tone_played_in_the_desktop_is_heard_by_the_page(farm: FarmProcess, desktop: int, browser: Any) -> None:
    """440 Hz played with ``paplay`` as the user: the page's analyser peaks at 440 Hz (one bin either way); when the
    page goes, the capture in the desktop ends (no parec nor encoder left)."""
    from playwright.sync_api import expect

    script = f"cat > /tmp/tone.py <<'EOF'\n{TONE}\nEOF\npython3 /tmp/tone.py 440 6 /tmp/tone.wav"
    assert farm.attach(desktop, script, user=LOGIN).returncode == 0
    ctx = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 800})
    ctx.set_default_timeout(30_000)
    try:
        page = ctx.new_page()
        goto(page, f"https://127.0.0.1:{farm.api_port}/")
        page.get_by_label("User name").fill(LOGIN)
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Log in").click()
        page.get_by_role("button", name=f"Connect to {LOGIN}-print").click()
        page.wait_for_function("() => document.body.dataset.firstFrame", timeout=60_000)
        button = page.locator("#sound-toggle")
        expect(button).to_have_text("Sound", timeout=20_000)
        stats_js = "({...window.deckardSound, analyser: null, context: window.deckardSound.context?.state})"
        try:
            page.wait_for_function("() => window.deckardSound.decoded > 10", timeout=20_000)
        except Exception:
            why = page.locator("#sound-toggle").get_attribute("title")
            logs = farm.attach(desktop, "grep -i sound /run/deckard/*.log; tail -n 20 /run/deckard/pulseaudio.log")
            diagnostics = f"{farm.diagnostics(desktop)}\n{logs.stdout}{logs.stderr}"
            raise AssertionError(f"no sound decoded ({why}): {page.evaluate(stats_js)}\n{diagnostics}") from None
        assert farm.attach(desktop, f"{PULSE} setsid -f paplay /tmp/tone.wav", user=LOGIN).returncode == 0
        deadline, peak = time.monotonic() + 8, None
        while time.monotonic() < deadline:
            peak = page.evaluate(PEAK)
            if peak and peak["db"] > -50 and abs(peak["hz"] - 440) <= peak["width"]:
                break
            page.wait_for_timeout(100)
        stats = page.evaluate(stats_js)
        assert peak and peak["db"] > -50 and abs(peak["hz"] - 440) <= peak["width"], (peak, stats)
        print(f"sound: peak {peak['hz']:.1f} Hz at {peak['db']:.0f} dB; page stats {stats}")
        assert stats["latencyMs"] is not None and stats["latencyMs"] < 1000, stats
        # 20 ms packets at about 50 a second, each under the channel's 128 kbit/s
        assert stats["bytes"] * 8 / (stats["packets"] * FRAME_MS / 1000) < 128_000, stats

        button.click()  # mute, remembered
        expect(button).to_have_text("Muted")
        assert page.evaluate("JSON.parse(localStorage.getItem('deckard.portal.sound')).muted") is True
        button.click()
        expect(button).to_have_text("Sound")
    finally:
        ctx.close()
    left = f"pgrep -u {LOGIN} -f 'parec|opus_encoder_create' || true"
    wait_for(lambda: not farm.attach(desktop, left).stdout.strip(), 10, 0.3, "the capture to end with the page")


def test_a_tone_played_in_the_desktop_reaches_a_qvd_clients_pulseaudio(farm: FarmProcess, desktop: int) -> None:
    """Sound over NX, as QVD's client has it: nxproxy (``media=``) forwards nxagent's media channel to the client's
    PulseAudio; the desktop's server sends to it through its tunnel sink, which takes the streams while the client
    is attached (here nxagent shadows the desktop's Xvnc session, which the portal opened) and gives them back to
    the browser's sink when it goes."""
    reason = nx_unavailable_reason() or (None if shutil.which("pulseaudio") else "pulseaudio not installed")
    if reason:
        pytest.skip(reason)
    make = f"cat > /tmp/tone.py <<'EOF'\n{TONE}\nEOF\npython3 /tmp/tone.py 440 6 /tmp/tone.wav"
    assert farm.attach(desktop, f"test -f /tmp/tone.wav || {{ {make}; }}", user=LOGIN).returncode == 0

    def default_sink_is(name: str) -> bool:
        return farm.attach(desktop, f"{PULSE} pactl get-default-sink", user=LOGIN).stdout.strip() == name

    speakers = ClientSound().start()
    try:

        async def listen() -> None:
            async with NxViewer(media_port=speakers.port) as viewer:
                await viewer.connect(farm.broker, farm.ca, LOGIN, PASSWORD, desktop, {"qvd.client.link": "lan"})
                try:
                    await asyncio.to_thread(wait_for, lambda: default_sink_is("qvd_client"), 20, 0.3)
                except AssertionError:
                    logs = farm.attach(desktop, "tail -n 12 /run/deckard/nxagent.log").stdout
                    pytest.fail(f"the client's speakers never became the default sink\n{viewer.log()[-600:]}\n{logs}")
                play = f"{PULSE} setsid -f paplay /tmp/tone.wav >/dev/null 2>&1 </dev/null"
                assert farm.attach(desktop, play, user=LOGIN).returncode == 0
                await asyncio.sleep(1.0)
                heard = await asyncio.to_thread(speakers.record, 2.0)
                assert dominant_frequency(heard, speakers.RATE) == 440.0
                await viewer.disconnect()

        run_in_thread(listen)
        wait_for(lambda: default_sink_is("deckard"), 20, 0.3, "the browser's sink to be the default again")
    finally:
        speakers.close()
