import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("vagrant") is None,
                    reason="vagrant missing: apt-get install vagrant vagrant-libvirt (./bootstrap install)")
def test_vagrantfile_validates():
    p = subprocess.run(["vagrant", "validate"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "validated successfully" in p.stdout


def test_vagrantfile_runs_the_projects_own_installer():
    text = (ROOT / "Vagrantfile").read_text()
    assert "debian/bookworm64" in text and ":libvirt" in text and "lv.nested = true" in text
    assert "./bootstrap" in text
