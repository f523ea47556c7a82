"""lab.boot: what a kernel needs, beside the image, to boot (the parts without a VM)."""

from pathlib import Path

from lab.boot import tcg_cmdline
from lab.vm import BareKernel

CPUINFO = "processor\t: 0\nmodel name\t: AMD EPYC\ncpu MHz\t\t: 1996.249\n"


def test_lpj_is_the_host_clock_over_the_kernels_hz(tmp_path):
    bz = tmp_path / "bzImage"
    bz.write_bytes(b"")
    (tmp_path / "config").write_text("CONFIG_X=y\nCONFIG_HZ=1000\n")
    assert tcg_cmdline(BareKernel(bz), CPUINFO) == ["lpj=1996249"]


def test_lpj_assumes_250_hz_without_a_config(tmp_path):
    assert tcg_cmdline(BareKernel(tmp_path / "bzImage"), CPUINFO) == ["lpj=7984996"]


def test_no_lpj_when_the_host_clock_is_unknown(tmp_path):
    # guessing low would shorten every delay loop: nothing is better than a guess
    assert tcg_cmdline(BareKernel(Path("/nonexistent/bzImage")), "processor\t: 0\n") == []
