"""The persistent tree of a source build and the patches it carries.

A source build lives in ONE directory per source (cache_dir()/build/<build_id>/linux)
and is never copied: a built tree that moves rebuilds from scratch (absolute
paths in the objects).  Switching patch sets reverses the previously applied
patches (from copies kept in the build directory) down to the common prefix
and applies the new ones, so only the touched files recompile.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lab.run import BadInput, run
from lab.cache import atomic_write
from lab.kernels.sources.common import sha256_file


class PatchStack:
    """The patches applied to one persistent tree, tracked in state.json.

    Copies of applied patches are kept beside the tree, so a reversal uses
    exactly what was applied even after the original file was edited.
    """

    def __init__(self, build_dir: Path) -> None:
        self.build_dir = build_dir
        self.tree = build_dir / "linux"
        self.state_file = build_dir / "state.json"
        self.saved = build_dir / "applied"

    def state(self) -> dict[str, Any]:
        try:
            st: dict[str, Any] = json.loads(self.state_file.read_text())
            return st
        except (OSError, ValueError):
            return {}

    def save(self, **changes: object) -> None:
        st = {**self.state(), **changes}
        atomic_write(self.state_file, json.dumps(st, indent=2))

    def applied(self) -> list[dict[str, Any]]:
        return list(self.state().get("applied", []))

    def switch(self, patches: Sequence[Path]) -> list[str]:
        """Make the tree carry exactly `patches`, in this order, touching as little as possible.

        Returns what it did ("reversed X", "applied Y"), for the build log."""
        done: list[str] = []
        want = [{"path": str(p), "sha256": sha256_file(p)} for p in patches]
        have = self.applied()
        common = 0
        while common < min(len(want), len(have)) and want[common]["sha256"] == have[common]["sha256"]:
            common += 1
        self.save(dirty=True)
        for entry in reversed(have[common:]):
            saved = self.saved / entry["saved"]
            apply_patch(self.tree, saved, reverse=True, label=entry["path"])
            have.pop()
            saved.unlink(missing_ok=True)
            self.save(applied=have)
            done.append(f"reversed {entry['path']}")
        self.saved.mkdir(exist_ok=True)
        for i, entry in enumerate(want[common:], start=common):
            src = Path(entry["path"])
            try:
                apply_patch(self.tree, src)
            except BadInput:
                self.save(dirty=False)
                raise
            name = f"{i:02d}-{entry['sha256'][:12]}.patch"
            shutil.copyfile(src, self.saved / name)
            have.append({**entry, "saved": name})
            self.save(applied=have)
            done.append(f"applied {src}")
        done += [f"kept {e['path']}" for e in want[:common]]
        self.save(dirty=False)
        return done


_HUNK_FAIL = re.compile(r"^(Hunk #\d+ FAILED at \d+.*|.*Reversed \(or previously applied\) patch detected.*|"
                        r"can't find file to patch.*|No file to patch.*|patch: \*\*\*\* .*)$", re.M)


def apply_patch(tree: Path, patch: Path, *, reverse: bool = False, label: str | None = None) -> None:
    """Apply (or reverse) one patch with -p1; dry-run first so a failure changes nothing.

    A patch that does not apply is the user's to fix: BadInput naming the
    file and the failing hunk(s).
    """
    argv = ["patch", "-p1", "--batch", "--forward", "--no-backup-if-mismatch", "-i", str(patch)]
    if reverse:
        argv = ["patch", "-p1", "--batch", "-R", "--no-backup-if-mismatch", "-i", str(patch)]
    dry = run([*argv, "--dry-run"], cwd=tree, check=False)
    if dry.returncode != 0:
        out = dry.stdout + dry.stderr
        current = ""
        problems = []
        for line in out.splitlines():
            if line.startswith(("patching file ", "checking file ")):
                current = line.split(" ", 2)[2]
            elif _HUNK_FAIL.match(line):
                problems.append(f"{current}: {line}" if current else line)
        what = "cannot be reversed in" if reverse else "does not apply to"
        detail = "\n    ".join(problems or out.splitlines()[-8:])
        raise BadInput(f"patch {label or patch} {what} {tree}:\n    {detail}",
                       hint="rebase the patch onto this kernel version (patches apply in the order given)")
    run(argv, cwd=tree)
