"""Kernel-side evidence: ftrace kprobes as a flight recorder (filled in by issue 5/8 work)."""

from __future__ import annotations

from typing import Any


class Tracer:
    def __init__(self, opts: dict[str, Any]) -> None:
        self.opts = opts

    def __enter__(self) -> "Tracer":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def collect(self) -> dict[str, Any]:
        return {"available": False, "note": "tracing not implemented yet"}
