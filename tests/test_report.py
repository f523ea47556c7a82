"""report.html: what a kernel engineer opens first.  Built from a real repro summary."""
import copy
import json
from html.parser import HTMLParser
from pathlib import Path

from lab import report
from lab.verdict import decide

ROOT = Path(__file__).resolve().parent.parent
REAL = json.loads((ROOT / "tests/fixtures/results/summary-repro-generic-vm.json").read_text())


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.ids, self.text = [], set(), []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "a":
            self.links.append(a.get("href"))
        if "id" in a:
            self.ids.add(a["id"])

    def handle_data(self, data):
        self.text.append(data)


def _write(tmp_path, targets, meta):
    rows = [decide(r["kernel"], vms=r["vms"], packets=r["packets"], seconds=r["seconds"], wall=r["wall"],
                   by_kind=r["by_kind"], first_violation_s=r["first_violation_s"]) for r in REAL["rows"]]
    path = tmp_path / "report.html"
    report.write_html(path, "racelab repro generic-rx-race", rows, targets, meta)
    page = _Page()
    page.feed(path.read_text())
    page.close()
    return page, "".join(page.text)


def test_the_report_links_the_files_and_says_how_to_rerun(tmp_path):
    cache, tmp_path = tmp_path / "cache", tmp_path / "run"
    tmp_path.mkdir()
    targets = copy.deepcopy(REAL["targets"])
    (tmp_path / "evidence").mkdir()
    (tmp_path / "vms").mkdir()
    for t in targets:          # the results directory as a run leaves it, here
        label = t["label"].replace("/", "_").replace("+", "_")
        console = tmp_path / "vms" / f"{label}.console.log"
        console.write_text("[    0.000000] Linux version 6.1.192\n")
        t["evidence"]["console"] = str(console)
        t["evidence"]["dmesg"] = str(tmp_path / "evidence" / f"{label}.dmesg")
        Path(t["evidence"]["dmesg"]).write_text("dmesg\n")
        if t["evidence"].get("trace_file"):
            t["evidence"]["trace_file"] = str(tmp_path / "evidence" / f"{label}.trace")
    meta = copy.deepcopy(REAL["provenance"])
    cfg = cache / "config"       # in the kernel cache, outside the results: file://
    cfg.parent.mkdir()
    cfg.write_text("CONFIG_XDP_SOCKETS=y\n")
    (cfg.parent / "build.log").write_text("make\n")
    for k in meta["kernels"].values():
        k["config"] = str(cfg)
    page, text = _write(tmp_path, targets, meta)
    rel = [h for h in page.links if not h.startswith("file:")]
    assert sorted(h.split("/")[0] for h in rel) == ["evidence"] * 3 + ["vms"] * 2, page.links
    assert all((tmp_path / h).exists() for h in rel if not h.endswith(".trace")), "relative, inside the results"
    assert cfg.as_uri() in page.links and (cfg.parent / "build.log").as_uri() in page.links
    assert "counted in the guest" in text                       # the fixed control's trace stayed there
    assert "rerun" in page.ids and meta["rerun"] in text
    assert "provenance" in page.ids and "host_kernel" in text and meta["host_kernel"] in text
    assert "kernel 6.1.192" in text and "accelerator" in text   # per kernel, a row per field


def test_every_splat_is_shown_in_full(tmp_path):
    targets = copy.deepcopy(REAL["targets"])
    oops = ("BUG: kernel NULL pointer dereference, address: 00000000000000c4\n...\n"
            "Call Trace:\n xsk_generic_rcv+0x4a/0x90")
    targets[0]["violations"].append({"type": "violation", "kind": "kernel-splat", "text": oops})
    targets[1]["pre_load_splats"] = ["WARNING: CPU: 0 PID: 1 at init/main.c:1 boot_warn+0x1/0x2\n---[ end trace ]---"]
    _, text = _write(tmp_path, targets, REAL["provenance"])
    assert oops in text and "during the load (counted)" in text
    assert "boot_warn+0x1/0x2" in text and "before the load (not counted)" in text
    _, text = _write(tmp_path, REAL["targets"], REAL["provenance"])
    assert "Kernel splats" in text and "none" in text
