"""Results: the terminal table, summary.json, JUnit XML and an HTML report.

Every results directory records what produced it (provenance()): the run
configuration, the kernels' build keys and configs, the scenario, the host
kernel, the QEMU version, the accelerator and the seed.
"""

from __future__ import annotations

import html
import json
import math
import platform
import shlex
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.config import Backend, RunConfig, fmt_duration, to_jsonable
from lab.verdict import (NOT_REPRODUCED, REPRODUCED, WINDOW_HIT, Row, kinds_text, level_text, matches,
                          verdict_text)


def provenance(cfg: RunConfig, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    qemu = ""
    if shutil.which("qemu-system-x86_64"):
        try:
            out = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                                 text=True, timeout=10).stdout
            qemu = out.splitlines()[0] if out else ""
        except (OSError, subprocess.TimeoutExpired):
            pass
    from lab import __version__ as lab_version
    git = ""
    try:
        from lab.run import project_root
        git = subprocess.run(["git", "-C", str(project_root()), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return {
        "racelab": lab_version, "racelab_git": git,
        "host_kernel": platform.release(), "host": platform.node(),
        "python": platform.python_version(), "qemu": qemu,
        "seed": cfg.seed, "scenario": cfg.scenario, "backend": cfg.backend,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "amplifier_config": cfg.scenario_data.get("amplifier", {}),
        "command": " ".join(shlex.quote(a) for a in ["racelab", *sys.argv[1:]]),
        "rerun": rerun_command(cfg),
        **(extra or {}),
    }


def rerun_command(cfg: RunConfig) -> str:
    """`racelab run` with everything that decided this run, the seed included."""
    argv = ["racelab", "run", cfg.scenario, "--backend", cfg.backend]
    for k in cfg.kernels:
        argv += ["--kernel", k]
    if cfg.backend == Backend.VM:
        argv += ["--vms", str(cfg.vms)]
    argv += ["--duration", f"{cfg.duration:g}s", "--seed", str(cfg.seed)]
    if cfg.variant:
        argv += ["--variant", cfg.variant]
    for o in cfg.overrides:
        argv += ["--set", o]
    if cfg.mitigation:
        argv += ["--mitigation", cfg.mitigation]
    for e in cfg.evidence:
        argv += ["--evidence", e]
    if not cfg.evidence and cfg.scenario_data.get("evidence", {}).get("corruption_rare"):
        argv += ["--evidence", "none"]   # such a scenario traces unless told not to
    if cfg.stop_on_first:
        argv.append("--stop-on-first")
    if cfg.inject:
        argv += ["--inject", cfg.inject]
    for u in cfg.uris:
        if u != "qemu:///system":
            argv += ["--uri", u]
    return " ".join(shlex.quote(a) for a in argv)


def row_dict(row: Row) -> dict[str, Any]:
    d: dict[str, Any] = to_jsonable(row)
    d["violations"] = row.violations
    d["onsets"] = row.onsets
    d["kinds_text"] = kinds_text(row)
    d["verdict_text"] = verdict_text(row)
    d["rate_text"] = level_text(row.corruption, row.packets, row.confidence)
    d["window_text"] = level_text(row.window, row.packets, row.confidence)
    return d


def print_table(rows: list[Row], title: str) -> None:
    """A verdict table, one row per kernel (rich when stdout is a terminal)."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, show_lines=True)
    pct = f"{rows[0].confidence * 100:.0f}%" if rows else "95%"
    for col in ("kernel", "VMs", "wall", "packets", "violations by kind", "first violation",
                f"corruption rate ({pct})", "window hits", "verdict"):
        t.add_column(col, overflow="fold")
    for r in rows:
        kinds = kinds_text(r)
        first = first_text(r)
        window = (str(r.window.count) if r.window.available else "n/a")
        style = {REPRODUCED: "bold red", WINDOW_HIT: "bold dark_orange",
                 NOT_REPRODUCED: "bold green"}.get(r.verdict, "bold yellow")
        t.add_row(r.kernel, str(r.vms), fmt_duration(r.wall), f"{r.packets:,}", kinds, first,
                  level_text(r.corruption, r.packets, r.confidence), window,
                  f"[{style}]{_short(verdict_text(r))}[/]")
    width = shutil.get_terminal_size((140, 24)).columns if sys.stdout.isatty() else 220
    Console(width=max(140, width)).print(t)


# one column per traced event: R receive, x failed receive (its return), F flush (one
# socket), A flush of every socket on the CPU, ! the checker's violation marker, ~ lost events
_GLYPH = {"rcv": "R", "flush": "F", "flushall": "A", "lost": "~"}


def _glyph(e: list[Any]) -> str:
    kind, detail = e[2], e[3]
    if kind == "rcvret":
        return "x" if isinstance(detail, int) and detail != 0 else "r"
    if kind == "mark":
        return "!" if str(detail).startswith("racelab violation") else "m"
    return _GLYPH.get(kind, "?")


def interleaving_lanes(ev: dict[str, Any], width: int = 60) -> list[str]:
    """The per-CPU timeline of a target's trace around its first violation (else its first
    window hit), one text lane per CPU, the last `width` events up to and just past it."""
    il = ev.get("interleaving") or []
    if not il:
        return []
    at = int(ev.get("interleaving_at", len(il) - 1))
    if not 0 <= at < len(il):
        at = len(il) - 1
    after = 4                                  # a few events past the focus
    cut = il[max(0, at + 1 + after - width):at + 1 + after]
    cpus = sorted({e[1] for e in cut})
    lanes = [f"  cpu{c:<3} " + "".join(_glyph(e) if e[1] == c else "." for e in cut) for c in cpus]
    focus_col = at - max(0, at + 1 + after - width)
    pointer = " " * (9 + focus_col) + "^ " + ("the marker" if ev.get("interleaving_focus") == "violation"
                                              else "the hit's return")
    return [f"  {len(cut)} events, counter {cut[0][0]}..{cut[-1][0]} (R receive, r its success, x its failure, "
            f"F/A flush, ! violation marker)"] + lanes + [pointer]


def print_interleavings(targets: list[Any]) -> None:
    """In short, after the table: the interleaving that led to each target's first corruption
    (or, with none, its first window hit), from its flight recorder."""
    for t in targets:
        ev = getattr(t, "evidence", None) if not isinstance(t, dict) else t.get("evidence")
        lanes = interleaving_lanes(ev or {})
        if not lanes:
            continue
        label = t["label"] if isinstance(t, dict) else t.label
        focus = (ev or {}).get("interleaving_focus")
        what = "first violation" if focus == "violation" else "first window hit"
        print(f"{label}: interleaving before the {what} ({(ev or {}).get('hits_before_violation', '-')} "
              f"window hit(s) before it)" if focus == "violation" else f"{label}: interleaving at the {what}")
        print("\n".join(lanes))


def first_text(r: Row) -> str:
    """Time to first violation, from the senders' ready line (or, said so, from load start)."""
    if r.first_violation_s is None:
        return "-"
    text = fmt_duration(r.first_violation_s)
    return text + " (from load start)" if r.first_violation_origin == "load start" else text


def _short(text: str, n: int = 160) -> str:
    return text if len(text) <= n else text[:n - 3] + "..."


@dataclass(frozen=True)
class JunitCase:
    """One JUnit testcase: a kernel (and scenario) with its figures as properties."""

    classname: str
    name: str
    time: float
    props: tuple[tuple[str, Any], ...]
    result: str = ""       # "" (passed), "failure", "skipped" or "error"
    message: str = ""


def write_junit(path: Path, suite: str, cases: list[JunitCase]) -> None:
    """The one JUnit XML writer (racelab run and racelab matrix); how each case counts is
    its caller's decision (the verdict against the expectation, the --missed policy)."""
    ts = ET.Element("testsuite", name=suite, tests=str(len(cases)))
    for c in cases:
        tc = ET.SubElement(ts, "testcase", classname=c.classname, name=c.name, time=f"{c.time:.1f}")
        props = ET.SubElement(tc, "properties")
        for k, v in c.props:
            ET.SubElement(props, "property", name=k, value=str(v))
        if c.result:
            ET.SubElement(tc, c.result, message=c.message)
    for attr, result in (("failures", "failure"), ("skipped", "skipped"), ("errors", "error")):
        ts.set(attr, str(sum(c.result == result for c in cases)))
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(ts).write(path, encoding="unicode", xml_declaration=True)


def junit_cases(rows: list[Row], suite: str, expected: dict[str, str]) -> list[JunitCase]:
    """One testcase per kernel; it fails when the verdict contradicts the expectation."""
    cases = []
    for r in rows:
        props = (("verdict", r.verdict), ("packets", r.packets), ("violations", r.violations),
                 ("onsets", r.onsets), ("seconds", r.seconds),
                 ("first_violation_s", r.first_violation_s),
                 ("rate", level_text(r.corruption, r.packets, r.confidence)),
                 ("window_hits", r.window.count if r.window.available else "n/a"),
                 ("expected", expected.get(r.kernel, "")))
        exp = expected.get(r.kernel)
        result = message = ""
        if r.verdict not in (REPRODUCED, WINDOW_HIT, NOT_REPRODUCED):
            result, message = "error", verdict_text(r)
        elif exp and not matches(r, exp):
            # the level judged is named: "expected reproduced" is not met by a window hit
            result, message = "failure", f"expected {exp}, got {verdict_text(r)}"
        cases.append(JunitCase(suite, r.kernel, r.wall, props, result, message))
    return cases


def write_html(path: Path, title: str, rows: list[Row], targets: list[dict[str, Any]],
               meta: dict[str, Any]) -> None:
    """A self-contained page: verdict table, violation timeline per VM, rate chart per kernel."""
    esc = html.escape
    colors = {REPRODUCED: "#c0392b", WINDOW_HIT: "#e67e22", NOT_REPRODUCED: "#27ae60"}
    trs = []
    for r in rows:
        kinds = kinds_text(r)
        first = first_text(r)
        trs.append(
            f"<tr><td>{esc(r.kernel)}</td><td>{r.vms}</td><td>{fmt_duration(r.wall)}</td>"
            f"<td>{r.packets:,}</td><td>{esc(kinds)}</td><td>{first}</td>"
            f"<td>{esc(level_text(r.corruption, r.packets, r.confidence))}</td>"
            f"<td>{esc(level_text(r.window, r.packets, r.confidence))}</td>"
            f"<td style='color:#fff;background:{colors.get(r.verdict, '#d68910')}'><b>"
            f"{esc(verdict_text(r))}</b></td></tr>")
    timeline = _svg_timeline(targets)
    rates = _svg_rates(rows)
    interleavings = "".join(_svg_interleaving(t) for t in targets) or "<p>no trace with an interleaving</p>"
    files = _files_table(path.parent, targets, meta)
    splats = _splats(targets)
    rerun = meta.get("rerun") or meta.get("command") or ""
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #aaa;padding:4px 8px}}th{{background:#eee}}pre{{background:#f6f6f6;padding:1em;overflow-x:auto}}
#rerun{{white-space:pre-wrap;overflow-wrap:anywhere}}
a.gone{{color:#999}}</style>
</head><body><h1>{esc(title)}</h1>
<table><tr><th>kernel</th><th>VMs</th><th>wall</th><th>packets</th><th>violations by kind</th>
<th>first violation</th><th>corruption rate (95%)</th><th>window hits</th><th>verdict</th></tr>
{''.join(trs)}</table>
<h2>Violations over time, per target</h2>{timeline}
<h2>Violation rate per kernel (95% interval, per million packets)</h2>{rates}
<h2>Rerun</h2><pre id="rerun">{esc(rerun) or "(not recorded)"}</pre>
<h2>Kernel splats</h2>{splats}
<h2>Interleaving before the first violation (or the first window hit), per CPU</h2>{interleavings}
<h2>Files</h2>{files}
<h2>Provenance</h2>{_provenance_table(meta)}
<details><summary>provenance as JSON</summary>
<pre>{esc(json.dumps(meta, indent=2, sort_keys=True, default=str))}</pre></details>
</body></html>"""
    path.write_text(page)


def _link(base: Path, p: Any, text: str) -> str:
    """A link to a result file: relative when it is under the report's directory (the
    directory can be moved or served as is), else file:// (the cache, a console in /tmp)."""
    if not p:
        return "-"
    path = Path(str(p))
    try:
        href = path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        href = path.resolve().as_uri()
    cls = "" if path.exists() else " class='gone' title='not on this machine any more'"
    return f"<a href='{html.escape(href, quote=True)}'{cls}>{html.escape(text)}</a>"


def _files_table(base: Path, targets: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """Per target: its console, dmesg and trace; per kernel: its .config and build log."""
    rows = []
    for t in targets:
        ev = t.get("evidence") or {}
        label = str(t.get("label", ""))
        log = _link(base, ev["dmesg"], "dmesg") if ev.get("dmesg") else _link(base, ev.get("kernel_log"), "kernel log")
        trace = (_link(base, ev["trace_file"], "trace") if ev.get("trace_file")
                 else "counted in the guest" if ev.get("analysed_in") == "guest" else "-")
        rows.append(f"<tr><td>{html.escape(label)}</td><td>{_link(base, ev.get('console'), 'console')}</td>"
                    f"<td>{log}</td><td>{trace}</td></tr>")
    krows = []
    for name, k in sorted((meta.get("kernels") or {}).items()):
        cfg = k.get("config")
        build_log = Path(str(cfg)).with_name("build.log") if cfg else None
        krows.append(f"<tr><td>{html.escape(name)}</td><td>{_link(base, cfg, '.config')}</td>"
                     f"<td>{_link(base, build_log, 'build log') if build_log and build_log.exists() else '-'}</td>"
                     f"<td>{html.escape(str(k.get('key', '')))}</td></tr>")
    out = ("<table><tr><th>target</th><th>console</th><th>kernel log</th><th>trace</th></tr>"
           + "".join(rows) + "</table>") if rows else "<p>no targets</p>"
    if krows:
        out += ("<table style='margin-top:1em'><tr><th>kernel</th><th>config</th><th>build log</th>"
                "<th>cache key</th></tr>" + "".join(krows) + "</table>")
    return out


def _splats(targets: list[dict[str, Any]]) -> str:
    """Every splat in full: the ones that counted (kernel-splat violations) and the ones
    before the load, which decided nothing."""
    parts = []
    for t in targets:
        label = html.escape(str(t.get("label", "")))
        for v in t.get("violations") or []:
            if v.get("kind") == "kernel-splat" and v.get("text"):
                parts.append(f"<h3>{label}: during the load (counted)</h3><pre>{html.escape(v['text'])}</pre>")
        for text in t.get("pre_load_splats") or []:
            parts.append(f"<h3>{label}: before the load (not counted)</h3><pre>{html.escape(text)}</pre>")
    return "".join(parts) or "<p>none</p>"


def _provenance_table(meta: dict[str, Any]) -> str:
    """What produced the run, a row per field; per kernel a row per field of its own."""
    def cell(v: Any) -> str:
        return html.escape(v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str))
    rows = [f"<tr><th>{html.escape(k)}</th><td>{cell(v)}</td></tr>"
            for k, v in sorted(meta.items()) if k != "kernels"]
    for name, k in sorted((meta.get("kernels") or {}).items()):
        rows.append(f"<tr><th colspan=2>kernel {html.escape(name)}</th></tr>")
        rows += [f"<tr><th>{html.escape(f)}</th><td>{cell(v)}</td></tr>" for f, v in sorted(k.items())]
    return "<table id='provenance'>" + "".join(rows) + "</table>"


def axis_ticks(tmax: float, most: int = 8) -> list[float]:
    """Round ticks from 0 up to tmax, at most most+1 of them, 1, 2 or 5 times a power of
    ten apart: an axis a reader can read values off, not just its two ends."""
    if tmax <= 0:
        return [0.0]
    raw = tmax / most
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw * (1 - 1e-9))
    return [round(i * step, 9) for i in range(int(tmax / step + 1e-9) + 1)]


def _svg_timeline(targets: list[dict[str, Any]]) -> str:
    """One lane per target, its label on a line of its own above it (a label as long as
    "6.1.192+revert-generic-rx/vm-0 (6.1.192+revert-generic-rx)" never runs into the lane),
    violations as dots, the first violation as a bar; a time axis with round ticks."""
    if not targets:
        return "<p>no targets</p>"
    esc = html.escape
    w, lane, left, top = 900, 44, 20, 4
    tmax = max([t.get("load_seconds", 0) or 0 for t in targets] + [1.0])
    axis_y = top + lane * len(targets) + 4
    h = axis_y + 26

    def x_at(ts: float) -> float:
        return left + w * min(max(ts, 0.0), tmax) / tmax

    parts = [f"<svg id='timeline' width='{w + 2 * left}' height='{h}' xmlns='http://www.w3.org/2000/svg'>"]
    for i, t in enumerate(targets):
        y0 = top + i * lane
        infra = (f"<tspan fill='#d68910'> infrastructure: {esc(str(t['infra_error'])[:120])}</tspan>"
                 if t.get("infra_error") else "")
        parts.append(f"<text class='lane-label' x='0' y='{y0 + 14}' font-size='12'>{esc(t['label'])} "
                     f"({esc(t['kernel'])}){infra}</text>")
        parts.append(f"<line x1='{left}' y1='{y0 + 30}' x2='{left + w}' y2='{y0 + 30}' stroke='#ccc'/>")
        prev = 0
        for ts, _, n in t.get("timeline", []):
            if n > prev:
                parts.append(f"<circle cx='{x_at(ts):.1f}' cy='{y0 + 30}' r='4' fill='#c0392b'>"
                             f"<title>{n} violations by {ts:.2f}s</title></circle>")
            prev = n
        if t.get("first_violation_s") is not None:
            x = x_at(t["first_violation_s"])
            parts.append(f"<line x1='{x:.1f}' y1='{y0 + 22}' x2='{x:.1f}' y2='{y0 + 38}' stroke='#c0392b' "
                         "stroke-width='2'/>")
    parts.append(f"<line x1='{left}' y1='{axis_y}' x2='{left + w}' y2='{axis_y}' stroke='#888'/>")
    for tick in axis_ticks(tmax):
        x = x_at(tick)
        parts.append(f"<line x1='{x:.1f}' y1='{axis_y}' x2='{x:.1f}' y2='{axis_y + 5}' stroke='#888'/>"
                     f"<text class='tick' x='{x:.1f}' y='{axis_y + 18}' font-size='11' "
                     f"text-anchor='middle'>{tick:g} s</text>")
    parts.append("</svg>")
    return "".join(parts)


def _svg_interleaving(t: dict[str, Any]) -> str:
    """A target's flight recorder around its focus: one lane per CPU, events in counter
    order (receives blue, failed ones grey, flushes green, the violation marker red)."""
    ev = t.get("evidence") or {}
    il = ev.get("interleaving") or []
    if not il:
        return ""
    colours = {"R": "#2e86c1", "r": "#85c1e9", "x": "#aab7b8", "F": "#27ae60", "A": "#1e8449",
               "!": "#c0392b", "m": "#7d3c98", "~": "#f39c12"}
    cpus = sorted({e[1] for e in il})
    step, lane, left = max(3.0, min(8.0, 900 / len(il))), 26, 70
    w, h = left + step * len(il) + 20, lane * len(cpus) + 40
    esc = html.escape
    parts = [f"<h3>{esc(t.get('label', '?'))} ({esc(t.get('kernel', '?'))}): "
             f"{esc(str(ev.get('interleaving_focus', '')))}</h3>"
             f"<svg width='{w:.0f}' height='{h}' xmlns='http://www.w3.org/2000/svg'>"]
    row = {c: i for i, c in enumerate(cpus)}
    for c, i in row.items():
        y = 10 + i * lane
        parts.append(f"<text x='0' y='{y + 14}' font-size='12'>cpu{c}</text>"
                     f"<line x1='{left}' y1='{y + 10}' x2='{w - 10:.0f}' y2='{y + 10}' stroke='#ddd'/>")
    for k, e in enumerate(il):
        g = _glyph(e)
        x, y = left + k * step, 10 + row[e[1]] * lane
        tall = 20 if g in ("!", "F", "A") else 12
        parts.append(f"<rect x='{x:.1f}' y='{y + 10 - tall / 2:.1f}' width='{max(2.0, step - 1):.1f}' "
                     f"height='{tall}' fill='{colours.get(g, '#000')}'><title>{esc(str(e[0]))}: cpu{e[1]} "
                     f"{esc(e[2])} {esc(str(e[3])[:100])}</title></rect>")
    parts.append(f"<text x='{left}' y='{h - 4}' font-size='11'>counter {il[0][0]} .. {il[-1][0]}; blue: receive "
                 f"(light: succeeded, grey: failed), green: flush, red: violation marker</text></svg>")
    return "".join(parts)


def _svg_rates(rows: list[Row]) -> str:
    """Per kernel its name on a line of its own, under it the 95% interval of its rate as
    a bar, the interval's text after the bar (room for it is kept at the right)."""
    if not rows:
        return ""
    vals = [r.corruption.per_packet[1] * 1e6 for r in rows if r.packets]
    vmax = max(vals + [1e-9])
    w, bar, left, room = 700, 40, 20, 220
    parts = [f"<svg id='rates' width='{left + w + room}' height='{bar * len(rows) + 8}' "
             "xmlns='http://www.w3.org/2000/svg'>"]
    for i, r in enumerate(rows):
        y0 = 4 + i * bar
        lo, hi = (x * 1e6 for x in r.corruption.per_packet)
        color = {REPRODUCED: "#c0392b", WINDOW_HIT: "#e67e22"}.get(r.verdict, "#27ae60")
        x0, x1 = left + w * lo / vmax, left + w * hi / vmax
        parts.append(f"<text x='0' y='{y0 + 12}' font-size='12'>{html.escape(r.kernel)}</text>")
        parts.append(f"<rect x='{x0:.1f}' y='{y0 + 18}' width='{max(2, x1 - x0):.1f}' height='14' "
                     f"fill='{color}' opacity='0.7'/>")
        label = f"{lo:.3g}..{hi:.3g} /Mpkt" if r.violations else f"< {hi:.3g} /Mpkt"
        parts.append(f"<text x='{max(x1, x0 + 2) + 5:.1f}' y='{y0 + 29}' font-size='11'>{label}</text>")
    parts.append("</svg>")
    return "".join(parts)
