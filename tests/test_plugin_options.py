"""The pytest plugin refuses bad --racelab-* options in pytest_configure (exit 4, usage error),
instead of collecting a grid that cannot run or judges the wrong level."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def pytest_run(*opts):
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:randomly",
                           "--collect-only", "-q", *opts], cwd=ROOT, capture_output=True, text=True, timeout=300)


GRID = ("--racelab-kernels=6.1.192", "--racelab-scenarios=generic-rx-race")


@pytest.mark.parametrize("opts, says", [
    (("--racelab-kernels=6.1.192,no-such-kernel", "--racelab-scenarios=generic-rx-race"),
     "--racelab-kernels no-such-kernel: unknown kernel"),
    (("--racelab-kernels=6.1.192", "--racelab-scenarios=generic-rx-rac"),
     "--racelab-scenarios generic-rx-rac: unknown scenario"),
    ((*GRID, "--racelab-budget=soon"), "bad --racelab-budget: 'soon'"),
    ((*GRID, "--racelab-expect=6.1.192:generic-rx-race=cleen"), "unknown level 'cleen'"),
    ((*GRID, "--racelab-expect=6.1.192=clean"), "expected KERNEL:SCENARIO=LEVEL"),
    ((*GRID, "--racelab-expect=6.12.117:generic-rx-race=clean"), "no such cell in the grid"),
    ((*GRID, "--racelab-vms=0"), "--racelab-vms must be >= 1"),
    ((*GRID, "--racelab-missed=maybe"), "--racelab-missed 'maybe': one of fail, skip"),
    (("--racelab-kernels=6.1.192",), "go together"),
    (("--racelab-kernels=host", "--racelab-scenarios=generic-rx-race"), "'host' (this machine's kernel) goes"),
])
def test_bad_grid_options_are_a_usage_error(opts, says):
    p = pytest_run(*opts)
    assert p.returncode == 4, p.stdout[-2000:] + p.stderr[-2000:]
    assert says in p.stderr, p.stderr
    assert "collected" not in p.stdout


def test_every_bad_option_at_once():
    p = pytest_run("--racelab-kernels=nope", "--racelab-scenarios=nada", "--racelab-budget=soon",
                   "--racelab-expect=nope:nada=cleen", "--racelab-missed=Skip")
    assert p.returncode == 4
    for says in ("--racelab-kernels nope", "--racelab-scenarios nada", "--racelab-budget", "'cleen'",
                 "--racelab-missed 'Skip'"):
        assert says in p.stderr


def test_a_good_grid_is_collected():
    p = pytest_run(*GRID, "--racelab-budget=30s", "--racelab-expect=6.1.192:generic-rx-race=window",
                   "--racelab-missed=skip")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "test_cell[generic-rx-race-6.1.192]" in p.stdout
    p = pytest_run("--racelab-kernels=host", "--racelab-scenarios=generic-rx-race", "--racelab-backend=netns")
    assert p.returncode == 0 and "test_cell[generic-rx-race-host]" in p.stdout
