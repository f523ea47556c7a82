"""The guest boundary: lab/agent/ needs only the standard library and pyroute2, the
image ships it alone, and only it (of lab/) moves the image key."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lab import image
from lab.run import project_root

LAB = project_root() / "lab"


@pytest.fixture
def keys(tmp_path, monkeypatch):
    monkeypatch.setenv("RACELAB_CACHE", str(tmp_path / "cache"))
    return image.ensure_keys()


def _stage(files: list[image.LayerFile], root: Path) -> None:
    for f in files:
        dest = root / f.guest.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(f.content())


# Run with the image's files and the standard library only: -I (no PYTHONPATH, no cwd),
# -S (no site-packages, where the host's lab and everything else is installed).
_PROBE = r"""
import pkgutil, runpy, sys
root = sys.argv[1]
sys.path[:0] = [root + "/opt/racelab", root + "/opt/racelab/site"]
import lab.agent
names = [m.name for m in pkgutil.walk_packages(lab.agent.__path__, "lab.agent.")]
for name in names:
    if name != "lab.agent.__main__":
        __import__(name)
from lab.agent import topology
topology._iproute_class()                  # pyroute2, as the agent uses it
assert not hasattr(lab, "__file__") or lab.__file__ is None, lab.__file__   # namespace package
outside = sorted({m.split(".")[0] for m in sys.modules}
                 - set(sys.stdlib_module_names) - {"lab", "pyroute2", "__main__", "__mp_main__"})
assert not outside, f"imports from outside the stdlib and pyroute2: {outside}"
stray = sorted(m for m in sys.modules if m.startswith("lab.") and not m.startswith("lab.agent"))
assert not stray, f"host modules imported: {stray}"
print(" ".join(names))
sys.argv = ["lab.agent", "--help"]
runpy.run_module("lab.agent", run_name="__main__")
"""


def test_the_agent_runs_from_the_image_files_with_stdlib_and_pyroute2_only(keys, tmp_path):
    _stage(image.lab_layer(keys, binaries=[]), tmp_path / "guest")
    p = subprocess.run([sys.executable, "-I", "-S", "-c", _PROBE, str(tmp_path / "guest")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr
    imported = p.stdout.splitlines()[0].split()
    on_disk = {f"lab.agent.{q.stem}" for q in (LAB / "agent").glob("*.py") if q.stem != "__init__"}
    assert on_disk <= set(imported) and "lab.agent.topology" in imported
    assert "python -m lab.agent" in p.stdout            # the agent's --help, through __main__


def test_the_probe_refuses_a_host_import(keys, tmp_path):
    # the check above can fail: an agent module that imports a host module is caught
    files = image.lab_layer(keys, binaries=[])
    files.append(image.LayerFile("/opt/racelab/lab/agent/leak.py", 0o644, data=b"import lab.run\n"))
    _stage(files, tmp_path / "guest")
    p = subprocess.run([sys.executable, "-I", "-S", "-c", _PROBE, str(tmp_path / "guest")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert p.returncode != 0 and "No module named 'lab.run'" in p.stderr


def _layer_key(keys, lab_dir: Path) -> str:
    return image._layer_key("base", image.lab_layer(keys, binaries=[], lab_dir=lab_dir), 0)


def test_the_image_key_follows_the_agent_package_only(keys, tmp_path):
    lab = tmp_path / "lab"
    shutil.copytree(LAB, lab, ignore=shutil.ignore_patterns("__pycache__"))
    k0 = _layer_key(keys, lab)
    assert k0 == _layer_key(keys, LAB)
    for host_only in ("matrix.py", "__init__.py", "kernels/catalog.py", "sources/deb.py",
                      "schemas/summary.schema.json"):
        p = lab / host_only
        if p.exists():
            p.write_text(p.read_text() + "\n# a comment on the host\n")
    assert _layer_key(keys, lab) == k0
    (lab / "agent" / "topology.py").write_text((lab / "agent" / "topology.py").read_text() + "\n# x\n")
    assert _layer_key(keys, lab) != k0
