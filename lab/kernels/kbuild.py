"""Kernel configuration and compilation in a persistent tree.

Config: required fragments are merged (later fragments win per option) and
applied over `make allnoconfig` through KCONFIG_ALLCONFIG, then
`olddefconfig`; every option a fragment asks for must survive, or the build
stops naming each lost option and its Kconfig "depends on" lines.  Nothing
may be a module (=m): only bzImage is built, so a module would be missing.

Build: `make -jN bzImage` with ccache, output to build.log, and a live
one-line progress on a TTY (periodic log lines otherwise).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from lab.cache import atomic_write
from lab.kernels import bzimage
from lab.progress import Display
from lab.run import BadInput, BuildFailed, cache_dir, log, run, spawn

ARCH = "x86_64"


@dataclass(frozen=True)
class BuildNeed:
    """One apt package a kernel build needs, and how to tell it is installed."""

    package: str                   # what to apt-get install
    tools: tuple[str, ...] = ()    # commands it puts on PATH
    headers: tuple[str, ...] = ()  # headers it installs, relative to an include directory


BUILD_NEEDS = (
    BuildNeed("build-essential", ("make", "gcc"), ("stdio.h",)),    # stdio.h: libc6-dev, for host programs
    BuildNeed("binutils", ("ld", "objcopy")),
    BuildNeed("bc", ("bc",)),                     # kernel/time/timeconst.bc
    BuildNeed("bison", ("bison",)),               # scripts/kconfig, genksyms
    BuildNeed("flex", ("flex",)),
    BuildNeed("perl", ("perl",)),
    BuildNeed("libssl-dev", (), ("openssl/opensslv.h", "openssl/evp.h")),   # sign-file, certs/extract-cert
    BuildNeed("libelf-dev", (), ("gelf.h", "libelf.h")),    # objtool (ORC unwinder, x86_64)
    BuildNeed("dwarves", ("pahole",)),            # BTF, when a fragment asks for DEBUG_INFO_BTF
    BuildNeed("cpio", ("cpio",)),                 # kheaders, initramfs lists
    BuildNeed("zstd", ("zstd",)),
    BuildNeed("ccache", ("ccache",)),
    BuildNeed("patch", ("patch",)),
    BuildNeed("tar", ("tar",)),
    BuildNeed("xz-utils", ("xz",)),
)
BUILD_PACKAGES = " ".join(n.package for n in BUILD_NEEDS)
# where gcc looks for <...> headers on Debian amd64, in its order
INCLUDE_DIRS = (Path("/usr/local/include"), Path("/usr/include/x86_64-linux-gnu"), Path("/usr/include"))

_SET = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


# ---------------------------------------------------------------- fragments


def parse_config(text: str) -> dict[str, str]:
    """.config / fragment text -> {CONFIG_X: value}; 'is not set' becomes 'n'."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        m = _SET.match(line)
        if m:
            out[m.group(1)] = m.group(2)
            continue
        m = _UNSET.match(line)
        if m:
            out[m.group(1)] = "n"
    return out


def merge_fragments(paths: Sequence[Path]) -> dict[str, str]:
    """Options of all fragments in order; a later fragment overrides an earlier one."""
    merged: dict[str, str] = {}
    for p in paths:
        try:
            text = p.read_text()
        except OSError as e:
            raise BadInput(f"cannot read config fragment {p}: {e.strerror}") from None
        for k, v in parse_config(text).items():
            merged.pop(k, None)       # keep the order of the last setting
            merged[k] = v
    return merged


def render_config(options: dict[str, str]) -> str:
    return "".join(f"# {k} is not set\n" if v == "n" else f"{k}={v}\n" for k, v in options.items())


def config_hash(options: dict[str, str]) -> str:
    return hashlib.sha256(render_config(options).encode()).hexdigest()


@dataclass(frozen=True)
class LostOption:
    option: str       # CONFIG_X
    wanted: str       # what the fragment asked for
    got: str          # what olddefconfig left ('n' = not set)
    depends: tuple[str, ...]   # "depends on" lines from Kconfig, with the file they are in

    def __str__(self) -> str:
        got = "not set" if self.got == "n" else self.got
        dep = "; ".join(self.depends) if self.depends else "no 'depends on' (check 'select'/choice)"
        return f"{self.option}={self.wanted} became {got}; depends on: {dep}"


def missing_options(wanted: dict[str, str], final: dict[str, str]) -> list[tuple[str, str, str]]:
    """(option, wanted, got) for every wanted value the final config lacks."""
    lost = []
    for k, v in wanted.items():
        got = final.get(k, "n")
        if v.startswith('"') and got.startswith('"'):  # noqa: SIM108 - a string, or a tristate whose n may be unset
            same = v == got
        else:
            same = v == got or (v == "n" and got in ("", "n"))
        if not same:
            lost.append((k, v, got))
    return lost


def kconfig_depends(tree: Path, option: str) -> tuple[str, ...]:
    """What `config OPTION` depends on in the tree's Kconfig files: its own
    'depends on' lines and those of the enclosing if/menu/choice blocks."""
    sym = option.removeprefix("CONFIG_")
    head = re.compile(rf"^\s*(menu)?config\s+{re.escape(sym)}\s*$")
    out: list[str] = []
    for kc in _kconfig_files(tree):
        try:
            lines = kc.read_text(errors="replace").splitlines()
        except OSError:
            continue
        if not any(head.match(x) for x in lines):
            continue
        rel = kc.relative_to(tree)
        blocks: list[list[str]] = []    # one list of conditions per open if/menu/choice
        header = False                  # inside a menu/choice header, before its first entry
        help_indent = -1                # inside help text indented deeper than this
        for i, line in enumerate(lines):
            s = line.strip()
            indent = len(line.expandtabs()) - len(line.expandtabs().lstrip())
            if help_indent >= 0:
                if not s or indent > help_indent:
                    continue
                help_indent = -1
            if s == "help" or s.startswith("---help---"):
                help_indent = indent
                continue
            word = s.split(" ", 1)[0] if s else ""
            if word == "if":
                blocks.append([f"depends on {s[3:].strip()} (enclosing if, {rel})"])
                header = False
            elif word in ("menu", "choice"):
                blocks.append([])
                header = True
            elif word in ("endif", "endmenu", "endchoice"):
                if blocks:
                    blocks.pop()
                header = False
            elif header and s.startswith("depends on") and blocks:
                blocks[-1].append(f"{s} (enclosing menu/choice, {rel})")
            elif word in ("config", "menuconfig", "source", "comment"):
                header = False
            if head.match(line):
                for b in blocks:
                    out.extend(b)
                for body in lines[i + 1:]:
                    text = body.strip()
                    if re.match(r"^(config|menuconfig|choice|endchoice|menu|endmenu|if|endif|source|comment)\b", text):
                        break
                    if text.startswith("depends on"):
                        out.append(f"{text} ({rel})")
    return tuple(dict.fromkeys(out))


def _kconfig_files(tree: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in ("Documentation", "tools")]
        for f in filenames:
            if f.startswith("Kconfig"):
                yield Path(dirpath) / f


def configure(tree: Path, options: dict[str, str], logf: IO[str], out: Path | None = None) -> dict[str, str]:
    """allnoconfig + the merged fragment, then olddefconfig; verify; return the final config.

    `out` is a separate output directory (make O=); by default the tree itself.
    """
    out = out or tree
    frag = out / ".racelab-fragment.config"
    frag.write_text(render_config(options))
    for target in ("allnoconfig", "olddefconfig"):
        argv = ["make", f"ARCH={ARCH}", f"KCONFIG_ALLCONFIG={frag}", *([f"O={out}"] if out != tree else []), target]
        logf.write(f"+ {' '.join(argv)}\n")
        logf.flush()
        proc = run(argv, cwd=tree, check=False, env=_make_env())
        logf.write(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise BuildFailed(f"make {target} failed in {tree}:\n    " +
                              "\n    ".join((proc.stdout + proc.stderr).strip().splitlines()[-15:]))
    final = parse_config((out / ".config").read_text())
    verify_config(tree, options, final)
    return final


def verify_config(tree: Path, options: dict[str, str], final: dict[str, str]) -> None:
    """Every required option survived, and nothing is a module: racelab builds
    bzImage alone, so an =m option would silently be missing from the guest.
    All problems in one BadInput."""
    lost = [LostOption(k, v, g, kconfig_depends(tree, k)) for k, v, g in missing_options(options, final)]
    modular = [k for k, v in final.items() if v == "m" and k not in {x.option for x in lost}]
    problems = [str(x) for x in lost]
    problems += [f"{k}=m: a module{' (the fragment asks for it)' if options.get(k) == 'm' else ''}; "
                 "racelab builds everything in" for k in modular]
    if not problems:
        return
    what = []
    if lost:
        what.append("required kernel options did not survive olddefconfig")
    if modular:
        what.append(f"{len(modular)} option(s) would be built as modules")
    hints = []
    if lost:
        hints.append("enable what they depend on in the fragment, or drop them")
    if modular:
        hints.append("set each module option to =y in the fragment, or add '# CONFIG_X is not set'")
    raise BadInput(" and ".join(what) + ":\n    " + "\n    ".join(problems), hint="; ".join(hints))


# ---------------------------------------------------------------- compiling


def missing_build_needs(path: str | None = None,
                        include_dirs: Sequence[Path] | None = None) -> list[tuple[str, list[str]]]:
    """(package, [missing tools and headers]) for each BUILD_NEEDS package not fully there.

    `path` is a PATH string (default: the environment's); include_dirs
    defaults to INCLUDE_DIRS."""
    dirs = INCLUDE_DIRS if include_dirs is None else include_dirs
    out = []
    for need in BUILD_NEEDS:
        gone = [t for t in need.tools if shutil.which(t, path=path) is None]
        gone += [h for h in need.headers if not any((d / h).is_file() for d in dirs)]
        if gone:
            out.append((need.package, gone))
    return out


def require_toolchain(path: str | None = None, include_dirs: Sequence[Path] | None = None) -> None:
    """Everything a source build needs, checked before any work; the hint names
    only the packages that are missing."""
    missing = missing_build_needs(path, include_dirs)
    if missing:
        raise BadInput("missing for a kernel build: " + ", ".join(x for _, gone in missing for x in gone),
                       hint=f"apt-get install {' '.join(pkg for pkg, _ in missing)}")


def compiler_version() -> str:
    """The first line of `gcc --version`: part of every source build's cache key,
    so even a cache hit needs gcc (and nothing else of the toolchain)."""
    if shutil.which("gcc") is None:
        raise BadInput("gcc not found: the kernel cache key includes the compiler version, "
                       "so gcc is needed even to find a cached build",
                       hint="apt-get install build-essential")
    return run(["gcc", "--version"]).stdout.splitlines()[0].strip()


def jobs() -> int:
    env = os.environ.get("RACELAB_JOBS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    return len(os.sched_getaffinity(0))


def _make_env() -> dict[str, str]:
    ccache = cache_dir() / "ccache"
    ccache.mkdir(parents=True, exist_ok=True)
    # Depend mode: a miss costs no extra preprocessor run (+36% CPU per miss
    # on kernel objects measured here); kbuild's -Wp,-MMD gives ccache the deps.
    return {"CCACHE_DIR": str(ccache), "CCACHE_MAXSIZE": os.environ.get("CCACHE_MAXSIZE", "8G"),
            "CCACHE_DEPEND": os.environ.get("CCACHE_DEPEND", "1"),
            "KBUILD_BUILD_USER": "racelab", "KBUILD_BUILD_HOST": "racelab",
            "LC_ALL": "C"}


_COMPILE = re.compile(r"^\s+(CC|AS|LD|AR|HOSTCC|GEN|OBJCOPY)\s")


@dataclass(frozen=True)
class Estimate:
    """How many steps a build will take, and where that number comes from."""

    steps: int
    source: str      # "this tree's last full build", "the 6.1 tree's full build", ...


def estimate_steps(build_dir: Path, fresh: bool) -> Estimate | None:
    """A full build's step count: this tree's own last one, else the nearest comparable
    tree's (the same series first, then any), so a first build still gets a percentage.
    None for an incremental build: it recompiles what the patches touched, no telling how much."""
    import json

    if not fresh:
        return None

    def full_steps(d: Path) -> int:
        try:
            return int(json.loads((d / "state.json").read_text()).get("full_steps", 0))
        except (OSError, ValueError, TypeError, AttributeError):
            return 0

    own = full_steps(build_dir)
    if own:
        return Estimate(own, "this tree's last full build")
    series = re.search(r"-(\d+\.\d+)", build_dir.name)
    others = [(d, full_steps(d)) for d in sorted(build_dir.parent.glob("*")) if d.is_dir() and d != build_dir]
    others = [(d, n) for d, n in others if n]
    same = [(d, n) for d, n in others if series and f"-{series.group(1)}" in d.name]
    for d, n in same or others:
        return Estimate(n, f"a full build of {d.name}")
    return None


class Progress:
    """A kernel build's progress, fed from make's output, on the one progress display
    (lab.progress): a bar with a percentage and an ETA on a TTY, otherwise a log line every
    `every` seconds.  The total comes from a comparable earlier build (estimate_steps), so
    the percentage and ETA are estimates: a build may take more steps than its model."""

    def __init__(self, label: str, enabled: bool, expected: int = 0, every: float = 30.0,
                 estimate: Estimate | None = None) -> None:
        self.label = label
        self.enabled = enabled
        self.estimate = estimate or (Estimate(expected, "an earlier build") if expected else None)
        self.expected = self.estimate.steps if self.estimate else 0
        self.start = time.monotonic()
        self.steps = 0
        self.display = Display(enabled, every=every, bar=f"[kernel] {label}")
        if self.enabled and self.estimate:
            log.info("[kernel] %s: ~%d steps expected (from %s)", label, self.expected, self.estimate.source)

    def line(self, text: str) -> None:
        if _COMPILE.match(text):
            self.steps += 1
        # a build past its model's step count stays below 100% until it ends
        total = max(self.expected, self.steps + 1) if self.expected else None
        self.display.update(self.text, completed=self.steps, total=total, current=text.strip()[-50:])

    def fraction(self) -> float | None:
        """Done so far, by the model's step count (below 1 until the build ends)."""
        return min(0.99, self.steps / self.expected) if self.expected else None

    def eta(self) -> float | None:
        """Seconds left at the rate so far; None before there is a rate or a model."""
        el = time.monotonic() - self.start
        if not self.expected or self.steps < 20 or el <= 0:
            return None
        return max(0.0, (self.expected - self.steps) / (self.steps / el))

    def text(self) -> str:
        el = time.monotonic() - self.start
        msg = f"[kernel] {self.label}: {self.steps} steps"
        frac = self.fraction()
        if frac is not None:
            msg += f" of ~{self.expected} (~{100 * frac:.0f}%)"
        msg += f", {int(el) // 60}m{int(el) % 60:02d}s"
        eta = self.eta()
        if eta is not None:
            msg += f", ETA ~{int(eta) // 60}m{int(eta) % 60:02d}s" if eta else ", ETA: past the estimate"
        return msg

    def done(self) -> None:
        self.display.close()


# ccache hashes a source and the headers it includes, never a file that an
# .incbin directive pulls in.  arch/x86/boot/compressed/piggy.S embeds the
# compressed vmlinux that way, and its text only changes when the payload's
# size does: a bisection step got a cache hit there and booted the previous
# commit's kernel (its bzImage carried the old vmlinux, byte for byte).  So
# every source that says .incbin is compiled without ccache.
CC_WRAPPER = """#!/bin/sh
# racelab's CC (lab/kernels/kbuild.py): ccache gcc, but plain gcc for a source that
# .incbin's another file, whose content ccache cannot see.
for a do
  case $a in
    *.c|*.S) if [ -f "$a" ] && grep -q '[.]incbin' "$a"; then exec gcc "$@"; fi ;;
  esac
done
exec ccache gcc "$@"
"""


def cc_wrapper() -> Path:
    """The CC given to make (written once into the cache; its path is part of every command line)."""
    path = cache_dir() / "bin" / "racelab-cc"
    if not path.is_file() or path.read_text() != CC_WRAPPER:
        atomic_write(path, CC_WRAPPER, mode=0o755)
    return path


def make(tree: Path, targets: Sequence[str], logf: IO[str], progress: Progress) -> None:
    """make -jN TARGETS with ccache; output to logf; BuildFailed with the tail on error."""
    argv = ["make", f"-j{jobs()}", f"ARCH={ARCH}", f"CC={cc_wrapper()}", "HOSTCC=ccache gcc", *targets]
    logf.write(f"+ {' '.join(argv)}\n")
    logf.flush()
    tail: list[str] = []
    # the bar is gone however make ends: done, failed, or Ctrl-C
    with progress.display, spawn(argv, cwd=tree, env=_make_env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, grace=10) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            logf.write(line)
            tail.append(line.rstrip("\n"))
            if len(tail) > 40:
                del tail[0]
            progress.line(line)
        rc = proc.wait()
    logf.flush()
    if rc != 0:
        raise BuildFailed(f"kernel build failed (make exit {rc}) in {tree}:\n    " + "\n    ".join(tail[-25:]),
                          hint=f"full log: {logf.name}")


def kernelrelease(tree: Path) -> str:
    return run(["make", "-s", f"ARCH={ARCH}", "kernelrelease"], cwd=tree, env=_make_env()).stdout.strip()


# ---------------------------------------------------------------- checks

def _first_difference(got: bytes, want: bytes) -> int:
    """The offset of the first byte where got and want differ (the shorter length if one is a prefix)."""
    return next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))


def check_payload(tree: Path) -> None:
    """The bzImage must carry the vmlinux this build linked.

    compressed/vmlinux.bin is that vmlinux, stripped (objcopy, never cached);
    the payload is it plus, on relocatable kernels, its relocation table.
    """
    bin_path = tree / "arch/x86/boot/compressed/vmlinux.bin"
    got = bzimage.payload((tree / "arch/x86/boot/bzImage").read_bytes())
    if got is None or not bin_path.is_file():
        log.debug("payload check skipped in %s (compression other than gzip/xz/bzip2?)", tree)
        return
    want = bin_path.read_bytes()
    if got[:len(want)] != want:
        raise BuildFailed(f"the bzImage built in {tree} does not carry the vmlinux just linked "
                          f"(payload {len(got)} bytes, vmlinux.bin {len(want)} bytes, first difference at "
                          f"byte {_first_difference(got, want)})",
                          hint=f"a stale object (ccache?); remove {tree / 'arch/x86/boot'} and build again")
