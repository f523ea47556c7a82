"""Hold a fresh network + mount namespace until the parent dies or is told to stop.

Run as a file, `python3 -S -I lab/agent/nskeeper.py`, by lab.agent.topology: it imports
only the standard library, so it starts in a fraction of the time a
`python -m lab.agent.topology` would take under TCG (no site, no lab package, no
pyroute2).  It prints {"ready": PID} or {"error": "..."} as one JSON line,
then sleeps; SIGTERM ends it, and so does the death of the parent
(PR_SET_PDEATHSIG), which takes the namespace with it.
"""

import ctypes
import json
import os
import signal

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
MS_REC = 0x4000
MS_PRIVATE = 1 << 18

MARKER = "nskeeper.py"   # what `pgrep -f` finds keepers by (tests, leak checks)


def _fail(what: str) -> None:
    print(json.dumps({"error": f"{what}: {os.strerror(ctypes.get_errno())}"}), flush=True)
    os._exit(1)


def main() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:      # the parent was gone before prctl took effect
        os._exit(1)
    if libc.unshare(CLONE_NEWNET | CLONE_NEWNS) != 0:
        _fail("unshare")
    # private mounts, and a sysfs that shows this namespace's devices
    libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None)
    if libc.mount(b"sysfs", b"/sys", b"sysfs", 0, None) != 0:
        _fail("mount sysfs")
    # tracefs/debugfs are under /sys: mount them again so trace_marker stays reachable
    for src, dst in ((b"tracefs", b"/sys/kernel/tracing"), (b"debugfs", b"/sys/kernel/debug")):
        libc.mount(src, dst, src, 0, None)
    print(json.dumps({"ready": os.getpid()}), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    while True:
        signal.pause()


if __name__ == "__main__":
    main()
