"""repro's expectations come from the catalog; a kernel it does not know gets none."""

from lab import scenario
from lab.repro import expectations


def test_catalog_kernels_are_expected_and_a_bzimage_is_not():
    s = scenario.load("veth-napi-race")
    exp = expectations(s, ["6.1.192+revert-veth-napi", "6.1.192", "bzimage:/x/bzImage"],
                       [("veth-napi-race",), (), None], None)
    assert exp == {"6.1.192+revert-veth-napi": "reproduced", "6.1.192": "clean"}


def test_a_preventing_mitigation_expects_the_affected_kernel_clean():
    s = scenario.load("veth-napi-race")
    assert expectations(s, ["a"], [("veth-napi-race",)], "threaded-napi") == {"a": "clean"}
