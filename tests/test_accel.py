"""The accelerator decision (lab/accel.py): the RACELAB_ACCEL override, how the
choice is worded, and the remote KVM probe's clean-up and cache, against fake
libvirt connections.  The real decision (a probe, or its cached answer) is made
at every guest boot of the vm tests (tests/test_vm.py) that does not set
RACELAB_ACCEL."""
import pytest

from lab import accel as accelmod
from lab import boot as bootmod
from lab.run import BadInput
from lab.vm import BareKernel


def test_accel_override(monkeypatch):
    monkeypatch.setenv("RACELAB_ACCEL", "tcg")
    assert accelmod.detect_accel(object()) == ("tcg", "forced by RACELAB_ACCEL=tcg")
    assert accelmod.detect_accel(object())[0] is accelmod.Accel.TCG
    assert [a.value for a in accelmod.Accel] == ["kvm", "tcg"]    # the words RACELAB_ACCEL and --accel take
    monkeypatch.setenv("RACELAB_ACCEL", "hvf")
    with pytest.raises(BadInput, match="RACELAB_ACCEL='hvf'"):
        accelmod.detect_accel(object())


def test_accelerator_line_says_why():
    assert accelmod.accel_text("tcg", "no /dev/kvm on this host") == "tcg (kvm unusable: no /dev/kvm on this host)"
    assert accelmod.accel_text("tcg", "forced by RACELAB_ACCEL=tcg") == "tcg (forced by RACELAB_ACCEL=tcg)"
    assert accelmod.accel_text("kvm", "KVM probe booted the kernel in 0.8s") == \
        "kvm (KVM probe booted the kernel in 0.8s)"
    assert accelmod.accel_text("tcg", "") == "tcg"


class _Conn:
    """A remote libvirtd as the probe sees it: its host UUID, and createXML as `create` does it."""

    def __init__(self, uuid, create):
        self.uuid, self.create = uuid, create

    def getDomainCapabilities(self, *a):
        return ""

    def getCapabilities(self):
        return f"<capabilities><host><uuid>{self.uuid}</uuid></host></capabilities>"

    def getVersion(self):
        return 9000000

    def createXML(self, xml, flags):
        return self.create(xml)

    def close(self):
        pass


def _remote(monkeypatch, tmp_path, conn):
    """A fake remote for accel._remote_accel: its connection, pool and boot files."""
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"k")
    monkeypatch.setenv("RACELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(accelmod, "connect", lambda uri: conn)
    monkeypatch.setattr(accelmod, "upload", lambda conn, path, name: f"/pool/{name}")
    monkeypatch.setattr(bootmod, "kernel_for_boot", lambda k: kernel)
    monkeypatch.setattr(bootmod, "probe_initrd", lambda: kernel)
    return BareKernel(kernel)


def test_remote_kvm_probe_destroys_its_domain_when_the_console_fails(monkeypatch, tmp_path):
    import libvirt

    class Dom:
        destroyed = False

        def destroy(self):
            Dom.destroyed = True

    def broken_stream(*a):
        raise libvirt.libvirtError("console stream failed")

    k = _remote(monkeypatch, tmp_path, _Conn("0-0", lambda xml: Dom()))
    monkeypatch.setattr(accelmod, "ConsoleStream", broken_stream)
    with pytest.raises(libvirt.libvirtError):
        accelmod._remote_accel(k, "qemu+ssh://lab2/system")
    assert Dom.destroyed


def test_the_remote_kvm_probe_is_cached_per_host_not_per_uri(monkeypatch, tmp_path):
    import libvirt

    started = []

    def create(xml):
        started.append(xml)
        raise libvirt.libvirtError("no KVM for you")

    k = _remote(monkeypatch, tmp_path, _Conn("5a1e-host", create))
    accel, why = accelmod._remote_accel(k, "qemu+ssh://root@lab2:2201/system?keyfile=/a")
    assert accel == "tcg" and "did not start" in why and len(started) == 1
    # the same host through another port and key: its libvirt host UUID finds the probe
    accel, why = accelmod._remote_accel(k, "qemu+ssh://lab@lab2:2202/system?keyfile=/b")
    assert accel == "tcg" and why.endswith("(cached probe)") and len(started) == 1
