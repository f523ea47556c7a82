"""Under RACELAB_ALL_TESTS a skip for a missing install step fails (tests/conftest.py)."""
from pathlib import Path


pytest_plugins = ["pytester"]

CONFTEST = (Path(__file__).with_name("conftest.py")).read_text()

TESTS = '''
import pytest

@pytest.mark.skipif(True, reason="busybox missing: apt-get install busybox-static")
def test_marker_package():
    pass

def test_call_package():
    pytest.skip("linux-source-6.12 is not installed: apt-get install linux-source-6.12")

@pytest.fixture
def kernel():
    pytest.skip("catalog kernel 6.12.117 is not built: `racelab kernel build 6.12.117`")

def test_fixture_kernel(kernel):
    pass

def test_machine_capability():
    pytest.skip("host kernel has no AF_XDP (CONFIG_XDP_SOCKETS=y)")

@pytest.mark.xfail(reason="apt-get install nothing: an xfail is not a skip")
def test_xfail():
    assert False

def test_passes():
    pass
'''


def run(pytester, monkeypatch, all_tests: bool):
    if all_tests:
        monkeypatch.setenv("RACELAB_ALL_TESTS", "1")
    else:
        monkeypatch.delenv("RACELAB_ALL_TESTS", raising=False)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_skips=TESTS)
    return pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider", "-rA")


def test_install_step_skips_fail_under_all_tests(pytester, monkeypatch):
    r = run(pytester, monkeypatch, all_tests=True)
    # the setup-phase skips (skipif marker, fixture) fail as errors, the call-phase one as a failure
    r.assert_outcomes(passed=1, skipped=1, failed=1, errors=2, xfailed=1)
    out = r.stdout.str()
    assert "this skip is a failure: linux-source-6.12 is not installed" in out
    assert "racelab kernel build 6.12.117" in out
    assert "SKIPPED" in out and "no AF_XDP" in out     # a machine's capability stays a skip
    assert r.ret == 1


def test_the_same_skips_stay_skips_otherwise(pytester, monkeypatch):
    r = run(pytester, monkeypatch, all_tests=False)
    r.assert_outcomes(passed=1, skipped=4, xfailed=1)
    assert r.ret == 0
