"""report.html in a real browser: headless Chromium (Debian's `chromium`) renders a report
written by lab/report.py from a recorded repro summary, and the rendered DOM, the
browser's console and a screenshot are checked.

JavaScript errors are read from Chromium's own log (`--enable-logging=stderr --v=0`
prints every console message, an uncaught exception as "Uncaught ..."), so the page is
loaded as it is, nothing injected; test_a_script_error_in_the_page_is_caught shows that
this channel does catch a broken script.  The layout checks measure the rendered SVG
boxes with a small probe script added to a copy of the page.
"""
import copy
import html
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import time
import zlib
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from lab import report
from lab.verdict import decide

ROOT = Path(__file__).resolve().parent.parent
REAL = json.loads((ROOT / "tests/fixtures/results/summary-repro-generic-vm.json").read_text())
WIDTH, HEIGHT = 1200, 900


@pytest.fixture(scope="module")
def chromium():
    exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("chromium missing: apt-get install chromium (or ./bootstrap install)")
    return exe


def _session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes of session sid: chromium and everything it forked."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(d.name))
    return pids


def run_chromium(exe: str, tmp: Path, *args: str) -> tuple[str, list[str]]:
    """Chromium, headless, in a session of its own with a throwaway profile: (stdout, the
    console messages it logged).  Every process of that session is gone afterwards."""
    profile = tmp / f"profile-{time.monotonic_ns()}"
    argv = [exe, "--headless=new", f"--user-data-dir={profile}", "--no-first-run",
            "--enable-logging=stderr", "--v=0", f"--window-size={WIDTH},{HEIGHT}", *args]
    if os.geteuid() == 0:
        argv.insert(1, "--no-sandbox")   # Chromium refuses to run as root with its sandbox
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=180)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        for pid in _session_pids(p.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while _session_pids(p.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        shutil.rmtree(profile, ignore_errors=True)
    assert _session_pids(p.pid) == [], "a chromium process was left running"
    assert p.returncode == 0, err[-3000:]
    # [pid:tid:date:INFO:CONSOLE:LINE] "message", source: URL (LINE)
    console = re.findall(r':CONSOLE[^\]]*\] "(.*)", source: ', err)
    return out, console


def results_dir(tmp_path: Path) -> tuple[Path, dict]:
    """A results directory as `racelab repro` leaves it, report.html written by lab/report.py
    from the recorded summary: consoles, dmesg and a trace under it, the kernels' .config and
    build log in a cache outside it."""
    run, cache = tmp_path / "run", tmp_path / "cache"
    for d in (run / "evidence", run / "vms", cache):
        d.mkdir(parents=True)
    targets = copy.deepcopy(REAL["targets"])
    for t in targets:
        label = t["label"].replace("/", "_").replace("+", "_")
        ev = t["evidence"]
        ev["console"] = str(run / "vms" / f"{label}.console.log")
        ev["dmesg"] = str(run / "evidence" / f"{label}.dmesg")
        Path(ev["console"]).write_text("[    0.000000] Linux version 6.1.192\n")
        Path(ev["dmesg"]).write_text("dmesg\n")
        if ev.get("trace_file"):
            ev["trace_file"] = str(run / "evidence" / f"{label}.trace")
            Path(ev["trace_file"]).write_text("trace\n")
    meta = copy.deepcopy(REAL["provenance"])
    (cache / "config").write_text("CONFIG_XDP_SOCKETS=y\n")
    (cache / "build.log").write_text("make\n")
    for k in meta["kernels"].values():
        k["config"] = str(cache / "config")
    rows = [decide(r["kernel"], vms=r["vms"], packets=r["packets"], seconds=r["seconds"], wall=r["wall"],
                   by_kind=r["by_kind"], first_violation_s=r["first_violation_s"]) for r in REAL["rows"]]
    report.write_html(run / "report.html", "racelab repro generic-rx-race", rows, targets, meta)
    return run, meta


class Dom(HTMLParser):
    """The links (href, text) of the rendered DOM and how many of each element each SVG
    holds ("svg#timeline circle" -> n)."""

    def __init__(self, text: str):
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self.count: dict[str, int] = {}
        self._href: str | None = None
        self._link_text: list[str] = []
        self._svg: str | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "a":
            self._href, self._link_text = a.get("href") or "", []
        if tag == "svg":
            self._svg = a.get("id", "")
        if self._svg is not None:
            key = f"svg#{self._svg} {tag}"
            self.count[key] = self.count.get(key, 0) + 1

    def handle_endtag(self, tag):
        if tag == "a" and self._href is not None:
            self.links.append((self._href, "".join(self._link_text)))
            self._href = None
        if tag == "svg":
            self._svg = None

    def handle_data(self, data):
        if self._href is not None:
            self._link_text.append(data)


def text_of(dom: str, tag: str, id_: str) -> str:
    """The text inside <tag id="id_"> of Chromium's serialised DOM (no nested tags)."""
    m = re.search(rf'<{tag} id="{id_}"[^>]*>(.*?)</{tag}>', dom, re.S)
    assert m, f"no <{tag} id={id_}> in the rendered page"
    return html.unescape(m.group(1))


def png_pixels(path: Path) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB(A) bytes) of an 8-bit RGB or RGBA PNG, unfiltered."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, ihdr = 8, b"", None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    assert ihdr is not None
    width, height, depth, colour, _, _, interlace = ihdr
    assert depth == 8 and colour in (2, 6) and interlace == 0, ihdr
    bpp = 3 if colour == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp
    rows, prev = [], bytearray(stride)
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        if f == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 255
        elif f == 2:
            line = bytearray((x + b) & 255 for x, b in zip(line, prev, strict=True))
        elif f == 3:
            for i in range(stride):
                line[i] = (line[i] + ((line[i - bpp] if i >= bpp else 0) + prev[i]) // 2) & 255
        elif f == 4:
            for i in range(stride):
                a, b = (line[i - bpp], prev[i]) if i >= bpp else (0, prev[i])
                c = prev[i - bpp] if i >= bpp else 0
                pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, rows


def test_the_report_loads_in_chromium_without_errors_with_its_timeline_and_links(chromium, tmp_path):
    run, meta = results_dir(tmp_path)
    page = (run / "report.html").as_uri()
    dom_text, console = run_chromium(chromium, tmp_path, "--dump-dom", page)
    assert not [m for m in console if m.startswith("Uncaught")], console
    dom = Dom(dom_text)
    # the timeline: a lane per target, a dot per jump in the affected guest's violations, an axis
    jumps = sum(1 for t in REAL["targets"] for a, b in zip([[0, 0, 0]] + t["timeline"], t["timeline"], strict=False)
                if b[2] > a[2])
    assert jumps > 0 and dom.count.get("svg#timeline circle") == jumps, dom.count
    assert "svg#rates rect" in dom.count and "svg#timeline line" in dom.count
    # every file of the run linked, and each link leads to the file (relative or file://)
    texts = [t for _, t in dom.links]
    for want in ("console", "dmesg", "trace", ".config", "build log"):
        assert want in texts, (want, dom.links)
    for href, text in dom.links:
        target = Path(unquote(urlparse(href).path)) if href.startswith("file:") else run / href
        assert target.is_file(), (text, href)
    assert text_of(dom_text, "pre", "rerun").strip() == meta["rerun"]
    assert f"<td>{html.escape(meta['host_kernel'])}</td>" in dom_text     # the provenance table


def test_the_report_screenshot_shows_the_page(chromium, tmp_path):
    run, _ = results_dir(tmp_path)
    shot = tmp_path / "report.png"
    _, console = run_chromium(chromium, tmp_path, f"--screenshot={shot}", (run / "report.html").as_uri())
    assert not [m for m in console if m.startswith("Uncaught")], console
    width, height, rows = png_pixels(shot)
    assert (width, height) == (WIDTH, HEIGHT)
    assert len(set(rows)) > HEIGHT // 4, "a page of text and charts, not a blank one"
    # the verdict cells as lab/report.py colours them: REPRODUCED red, NOT REPRODUCED green
    for rgb in (bytes.fromhex("c0392b"), bytes.fromhex("27ae60")):
        bpp = len(rows[0]) // width
        hits = sum(1 for r in rows for x in range(0, len(r), bpp * 4) if r[x:x + 3] == rgb)
        assert hits > 100, rgb.hex()


PROBE = """<pre id='probe'></pre><script>
function box(e) { const r = e.getBoundingClientRect(); return {t: e.textContent, l: r.left, r: r.right,
                  top: r.top, b: r.bottom}; }
function cut(a, b) { return a.l < b.r && b.l < a.r && a.top < b.b && b.top < a.b; }
const out = {};
for (const id of ['timeline', 'rates']) {
  const svg = document.getElementById(id), frame = box(svg);
  const texts = [...svg.querySelectorAll('text')].map(box);
  const marks = [...svg.querySelectorAll('line, circle, rect')].map(box);
  const clash = [];
  texts.forEach((a, i) => texts.slice(i + 1).forEach(b => { if (cut(a, b)) clash.push([a.t, b.t]); }));
  texts.forEach(a => marks.forEach(m => { if (cut(a, m)) clash.push([a.t, 'a ' + id + ' mark']); }));
  const outside = texts.filter(a => a.l < frame.l - 0.5 || a.r > frame.r + 0.5).map(a => a.t);
  out[id] = {clash, outside, ticks: [...svg.querySelectorAll('text.tick')].map(e => e.textContent)};
}
document.getElementById('probe').textContent = JSON.stringify(out);
</script>"""


def test_the_timeline_labels_do_not_overlap_and_its_axis_has_round_ticks(chromium, tmp_path):
    run, _ = results_dir(tmp_path)
    probed = run / "probed.html"
    probed.write_text((run / "report.html").read_text().replace("</body>", PROBE + "</body>"))
    dom_text, console = run_chromium(chromium, tmp_path, "--dump-dom", probed.as_uri())
    assert not [m for m in console if m.startswith("Uncaught")], console
    found = json.loads(text_of(dom_text, "pre", "probe"))
    for svg in ("timeline", "rates"):
        assert found[svg]["clash"] == [], (svg, found[svg]["clash"])
        assert found[svg]["outside"] == [], (svg, found[svg]["outside"])
    ticks = found["timeline"]["ticks"]
    tmax = max(t["load_seconds"] for t in REAL["targets"])
    assert len(ticks) >= 4 and ticks[0] == "0 s", ticks
    values = [float(t.removesuffix(" s")) for t in ticks]
    assert values == sorted(values) and values[-1] <= tmax < values[-1] + (values[1] - values[0])


def test_a_script_error_in_the_page_is_caught(chromium, tmp_path):
    """The console channel the tests above trust: a broken script in the same page is seen."""
    run, _ = results_dir(tmp_path)
    broken = run / "broken.html"
    broken.write_text((run / "report.html").read_text().replace(
        "</body>", "<script>racelabUndefinedFunction();</script></body>"))
    _, console = run_chromium(chromium, tmp_path, "--dump-dom", broken.as_uri())
    assert [m for m in console if m.startswith("Uncaught ReferenceError")
            and "racelabUndefinedFunction" in m], console
