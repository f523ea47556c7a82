"""The checker's first-violation marker reaches the trace (host kernel, root).

The checker writes its violation to trace_marker and turns tracing off at the first
one.  The kernel refuses marker writes while tracing is off, so the order decides
whether the flight recorder holds the marker at all (it used to stop first: every
recorded corrupting run had no marker).  The host kernel has no kprobes, but its
trace buffer takes markers: this writes into the host's top-level buffer, and puts
tracing_on back as it was.
"""
from pathlib import Path

import pytest

from test_checker_root import bin_dir, rxdrop_run, veth_pair  # noqa: F401 - bin_dir is a fixture

pytestmark = pytest.mark.root
TRACING = Path("/sys/kernel/tracing")


def test_first_violation_marker_is_written_before_tracing_stops(bin_dir):  # noqa: F811
    if not (TRACING / "trace_marker").exists():
        pytest.skip("no tracefs at /sys/kernel/tracing (mount -t tracefs nodev /sys/kernel/tracing)")
    saved = (TRACING / "tracing_on").read_text().strip()
    try:
        (TRACING / "trace").write_text("")
        (TRACING / "tracing_on").write_text("1")
        with veth_pair() as pair:
            out = rxdrop_run(bin_dir, pair, seconds=1.5, rate=200000, xdp="generic", inject="order",
                             trace_marker=True)
        assert out.done["by_kind"]["order"] >= 1, out.summary()
        # the checker stopped the recorder at its first violation...
        assert (TRACING / "tracing_on").read_text().strip() == "0"
        # ...after that violation's marker, and nothing after it got in
        marks = [ln for ln in (TRACING / "trace").read_text().splitlines() if "racelab violation" in ln]
        assert len(marks) == 1 and "kind=order" in marks[0], marks
    finally:
        (TRACING / "trace").write_text("")
        (TRACING / "tracing_on").write_text(saved or "1")
