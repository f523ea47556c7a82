"""shared-pool-rx-race end to end: the three expected outcomes, real kernels, real guests.

a1356ac7749c moved the generic-receive lock from the socket into the buffer
pool.  6.1.192+revert-shared-pool undoes it alone, so:
- two sockets on one queue (one pool) on that kernel: REPRODUCED;
- one socket per queue on that kernel: NOT REPRODUCED (bf0bdd1343ef's
  per-socket lock still covers it);
- two sockets on one queue on 6.1.192 as shipped: NOT REPRODUCED.
Kept short: the first stops at its first violation, the clean ones run 10 s (30 s once more
when a starved host let too few packets through).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vm, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent
AFFECTED = "6.1.192+revert-shared-pool"


def run(out: Path, kernel: str, *args: str, duration: str = "10s"):
    p = subprocess.run([sys.executable, "-m", "lab.cli", "run", "shared-pool-rx-race", "--backend", "vm",
                        "--kernel", kernel, "--duration", duration, "--out", str(out), "--json", *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr[-4000:]
    (row,) = json.loads((out / "summary.json").read_text())["rows"]
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines() if line.strip()]
    ready = next(e for e in events if e.get("type") == "ready")
    stats = [e for e in events if e.get("type") in ("stats", "done") and "socket_rx" in e]
    return row, ready, stats[-1] if stats else None


def run_clean(out: Path, kernel: str, *args: str):
    """A run expected clean, with exposure enough for "clean" to mean something (> 50,000
    packets).  A CI host busy with a kernel build can slow a TCG guest's load twenty-fold
    (4,363 packets in 10 s once, against ~240,000 with the CPUs merely contended): such a run
    is said and repeated once for 30 s, and the longer run decides."""
    row, ready, last = run(out, kernel, *args)
    if row["verdict"] == "NOT REPRODUCED" and row["packets"] <= 50_000:
        print(f"{kernel}: {row['packets']:,} packets in {row['seconds']:.1f} s; again for 30 s")
        row, ready, last = run(out.parent / f"{out.name}-again", kernel, *args, duration="30s")
    return row, ready, last


def test_two_sockets_on_one_queue_reproduce_on_the_revert(tmp_path):
    row, ready, _ = run(tmp_path, AFFECTED, "--stop-on-first", duration="60s")
    assert (ready["sockets"], ready["sockets_per_queue"], ready["pick"]) == (2, 2, "cpu"), ready
    assert row["verdict"] == "REPRODUCED", row
    assert row["onsets"] >= 1 and row["first_violation_s"] is not None, row
    # what two CPUs taking from one pool at once leave behind
    assert set(row["by_kind"]) & {"duplicate", "meta", "order", "over-held", "checksum", "sequence", "length"}, row


def test_one_socket_per_queue_stays_clean_on_the_revert(tmp_path):
    row, ready, last = run_clean(tmp_path / "one-socket", AFFECTED, "--variant", "one-socket")
    assert (ready["sockets"], ready["sockets_per_queue"]) == (1, 1), ready
    assert row["verdict"] == "NOT REPRODUCED", row
    assert row["violations"] == 0 and row["packets"] > 50_000, row


def test_two_sockets_on_one_queue_stay_clean_on_the_fixed_kernel(tmp_path):
    row, ready, last = run_clean(tmp_path / "fixed", "6.1.192")
    assert (ready["sockets"], ready["sockets_per_queue"]) == (2, 2), ready
    assert row["verdict"] == "NOT REPRODUCED", row
    assert row["violations"] == 0 and row["packets"] > 50_000, row
    # the load really went through both sockets of the pool, or "clean" would mean nothing
    assert last is not None and len(last["socket_rx"]) == 2 and min(last["socket_rx"]) > 10_000, last
