"""git:/repo@REF: a tree at a ref, checked out in ONE worktree per repository.

Moving the worktree to another commit keeps the untracked build output, so
bisection steps rebuild incrementally.  The identity is the commit id.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

from lab.run import BadInput, CommandFailed, require_tools, run
from lab.kernels.sources.common import Resolved, SourceRef, series_of
from lab.kernels.sources.tree import PatchStack

KIND = "git"
EXAMPLE = "git:/path/to/linux@REF"


def parse(arg: str) -> SourceRef:
    repo, at, ref = arg.rpartition("@")
    if not at or not repo or not ref:
        raise BadInput(f"git source needs a ref: {f'{KIND}:{arg}'!r}", hint="e.g. git:/src/linux@v6.1")
    return SourceRef(KIND, repo, ref)


def _repo(ref: SourceRef) -> Path:
    require_tools("git")
    repo = Path(ref.arg).expanduser().resolve()
    if not (repo / ".git").exists() and not (repo / "HEAD").exists():
        raise BadInput(f"not a git repository: {repo}")
    return repo


def _commit(repo: Path, rev: str) -> str:
    proc = run(["git", "-C", repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], check=False)
    if proc.returncode != 0:
        raise BadInput(f"unknown git ref {rev!r} in {repo}", hint="git fetch, or check the tag/branch name")
    return proc.stdout.strip()


def makefile_version(repo: Path, rev: str) -> str:
    """VERSION.PATCHLEVEL.SUBLEVEL from the top Makefile at rev, or ''."""
    mk = run(["git", "-C", repo, "show", f"{rev}:Makefile"], check=False).stdout
    v = [re.search(rf"^{k}\s*=\s*(\S*)", mk, re.M) for k in ("VERSION", "PATCHLEVEL", "SUBLEVEL")]
    return ".".join(m.group(1) for m in v if m) if all(v) else ""


def resolve(ref: SourceRef) -> Resolved:
    repo = _repo(ref)
    sha = _commit(repo, ref.ref)
    repo_id = hashlib.sha256(str(repo).encode()).hexdigest()[:12]
    return Resolved(ref, f"git:{sha}", f"git-{repo.name}-{repo_id}", makefile_version(repo, sha), repo)


def series(ref: SourceRef) -> str:
    """From the Makefile at the ref (one git show, no checkout)."""
    repo = _repo(ref)
    return series_of(makefile_version(repo, _commit(repo, ref.ref)))


def prepare(res: Resolved, stack: PatchStack) -> list[str]:
    assert res.origin is not None
    sha = res.identity.split(":", 1)[1]
    st = stack.state()
    if not (stack.tree / ".git").exists():
        run(["git", "-C", res.origin, "worktree", "prune"], check=False)
        run(["git", "-C", res.origin, "worktree", "add", "--detach", stack.tree, sha])
        stack.save(identity=res.identity, applied=[], dirty=False)
        return [f"new worktree of {res.origin} at {sha[:12]} in {stack.tree}"]
    done = []
    if st.get("dirty"):
        # Tracked files back to the commit; untracked build output stays.
        run(["git", "-C", stack.tree, "checkout", "-f", "--detach", st.get("identity", res.identity).split(":", 1)[1]])
        shutil.rmtree(stack.saved, ignore_errors=True)
        stack.save(applied=[], dirty=False)
        done.append("half-patched worktree reset with git checkout -f")
    if st.get("identity") != res.identity:
        stack.switch([])
        try:
            run(["git", "-C", stack.tree, "checkout", "--detach", sha])
        except CommandFailed as e:
            raise BadInput(f"cannot check out {sha[:12]} in {stack.tree}: {e.stderr.strip()}") from None
        stack.save(identity=res.identity)
        done.append(f"checked out {sha[:12]}")
    return done
