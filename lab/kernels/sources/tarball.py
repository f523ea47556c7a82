"""tarball:PATH|URL|NAME: a kernel tarball, extracted once into the persistent tree.

A URL is fetched once into cache_dir()/downloads; a bare kernel.org name
(linux-6.1.5.tar.xz) and kernel.org URLs go through RACELAB_TARBALL_MIRROR.
The identity is the tarball's sha256 (remembered by path, size and mtime, so
a cache hit does not hash 140 MB again).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

from lab.run import BadInput, InfraError, cache_dir, log, require_tools, run
from lab.kernels.sources.common import Resolved, SourceRef, memo, save_memo, series_of, sha256_file
from lab.kernels.sources.tree import PatchStack

KIND = "tarball"
EXAMPLE = "tarball:/path/or/URL"
KERNEL_ORG = "https://cdn.kernel.org/pub/linux/kernel"
_VERSION = re.compile(r"linux-(\d+\.\d+(?:\.\d+)?)")


def parse(arg: str) -> SourceRef:
    return SourceRef(KIND, arg)


def tarball_url(arg: str) -> str | None:
    """The URL to fetch for a tarball: source, honouring RACELAB_TARBALL_MIRROR.

    A bare name (linux-6.1.5.tar.xz) means kernel.org's v6.x directory; a
    kernel.org URL is rewritten onto the mirror; other URLs are used as given.
    Returns None for local paths.
    """
    mirror = (os.environ.get("RACELAB_TARBALL_MIRROR") or KERNEL_ORG).rstrip("/")
    if re.fullmatch(r"linux-\d+\.\d+[\w.-]*\.tar\.(xz|gz|bz2)", arg) and not Path(arg).exists():
        major = arg.split("-")[1].split(".")[0]
        return f"{mirror}/v{major}.x/{arg}"
    if "://" in arg:
        if arg.startswith(KERNEL_ORG + "/"):
            return mirror + arg[len(KERNEL_ORG):]
        return arg
    return None


def resolve(ref: SourceRef) -> Resolved:
    url = tarball_url(ref.arg)
    if url is None:
        path = Path(ref.arg).expanduser().resolve()
        if not path.is_file():
            raise BadInput(f"tarball not found: {path}")
    else:
        path = _download(url)
    digest = _cached_digest(path)
    m = _VERSION.search(path.name)
    return Resolved(ref, f"tarball:sha256={digest}", f"tarball-{digest[:16]}", m.group(1) if m else "", path)


def series(ref: SourceRef) -> str:
    """From the file name (linux-6.1.5.tar.xz): nothing is downloaded for it."""
    url = tarball_url(ref.arg)
    name = Path(urllib.parse.urlparse(url).path).name if url else Path(ref.arg).name
    m = _VERSION.search(name)
    return series_of(m.group(1)) if m else ""


def prepare(res: Resolved, stack: PatchStack) -> list[str]:
    st = stack.state()
    if (stack.tree / "Makefile").is_file() and not st.get("dirty") and st.get("identity") == res.identity:
        return []
    if st.get("dirty"):
        log.warning("build tree %s was left half-patched; extracting it again (full rebuild)", stack.tree)
    extract(res, stack)
    return [f"extracted {res.origin} into {stack.tree}"]


def extract(res: Resolved, stack: PatchStack) -> None:
    """A fresh tree from res.origin (a tarball holding one kernel tree); the old one goes."""
    assert res.origin is not None
    require_tools("tar", "xz")
    if stack.tree.exists():
        shutil.rmtree(stack.tree)
    shutil.rmtree(stack.saved, ignore_errors=True)
    stack.state_file.unlink(missing_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=stack.build_dir))
    log.info("extracting %s", res.origin)
    run(["tar", "-xf", res.origin, "-C", tmp])
    tops = [p for p in tmp.iterdir() if p.is_dir()]
    if len(tops) != 1 or not (tops[0] / "Makefile").is_file():
        shutil.rmtree(tmp)
        raise BadInput(f"{res.origin} does not contain one kernel tree (found {[p.name for p in tops]})")
    os.replace(tops[0], stack.tree)
    tmp.rmdir()
    stack.save(identity=res.identity, applied=[], dirty=False)


def _cached_digest(path: Path) -> str:
    """sha256 of a big file, remembered by (path, size, mtime) so cache hits stay fast."""
    st = path.stat()
    known = memo("digests.json")
    k = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    if k not in known:
        known[k] = sha256_file(path)
        save_memo("digests.json", known)
    return known[k]


def _download(url: str) -> Path:
    dest_dir = cache_dir() / "downloads" / hashlib.sha256(url.encode()).hexdigest()[:16]
    dest = dest_dir / Path(urllib.parse.urlparse(url).path).name
    if dest.is_file():
        return dest
    dest_dir.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s", url)
    tmp = dest.with_suffix(dest.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as out:
            shutil.copyfileobj(resp, out, 1 << 20)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise InfraError(f"cannot fetch {url}: {e}",
                         hint="set RACELAB_TARBALL_MIRROR to a reachable kernel.org mirror, "
                              "or pass tarball:/local/path") from None
    os.replace(tmp, dest)
    return dest
