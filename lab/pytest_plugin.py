"""racelab's pytest plugin (entry point `pytest11`): fixtures and a scenario x kernel grid.

Options:
  --racelab-kernels=K1,K2     kernels for the grid (catalog names, deb:, git:, ...)
  --racelab-scenarios=S1,S2   scenarios for the grid
  --racelab-budget=60s        load budget per cell
  --racelab-vms=1             guests per cell
  --racelab-expect=K:S=LEVEL  override the level a cell judges (repeatable):
                              reproduced, window or clean
  --racelab-missed=fail|skip  an affected kernel that misses its level within the
                              budget: fails its cell (default) or is skipped

With --racelab-kernels and --racelab-scenarios, the plugin adds its own test,
`racelab_grid::test_cell[SCENARIO-KERNEL]`, one per cell.  A cell passes or
fails against the level derived from the catalog (the kernel's `affected`
list, i.e. its source and patches; lab.matrix.expected_for): a fixed kernel
with any violation or window hit fails ("clean"); an affected kernel must
reproduce ("reproduced"), or, for a scenario whose corruption is rare, at
least hit the race window ("window"); one that falls short within the budget
fails with its rate bound in the message (a kernel the catalog calls affected
that does not reproduce is news), or is skipped with that message under
--racelab-missed=skip.  `racelab matrix --missed` is the same policy: both
decide a cell with lab.matrix.decide().  Cells judging the window level
collect trace evidence.  Rate, time to first violation, packets, verdict and
the level judged go into JUnit as properties.

Fixtures (names unique per xdist worker: guests and namespaces carry the
worker's pid; the kernel cache is shared behind a file lock):

  racelab_kernel     session  factory: racelab_kernel("6.1.192") -> KernelArtifact (built or cached)
  racelab_image      session  the guest image (built or cached)
  racelab_vm         function factory: racelab_vm(kernel_name, vcpus=2) -> a booted VM; destroyed after
  racelab_fleet      function factory: racelab_fleet(kernel_name, n) -> list of booted VMs
  racelab_topology   function factory: racelab_topology(TopologySpec) -> Topology in fresh namespaces
  racelab_host       session  the local Host (netns backend)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from lab.host import LocalHost
    from lab.image import Image
    from lab.kernels.kernel import KernelArtifact
    from lab.agent.topology import Topology, TopologySpec
    from lab.vm import VM

GRID_MODULE = Path(__file__).with_name("racelab_grid.py")


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("racelab", "racelab kernel x scenario grid")
    g.addoption("--racelab-kernels", default="", help="comma-separated kernels for the grid")
    g.addoption("--racelab-scenarios", default="", help="comma-separated scenarios for the grid")
    g.addoption("--racelab-budget", default="60s", help="load budget per cell (default 60s)")
    g.addoption("--racelab-vms", type=int, default=1, help="guests per cell")
    g.addoption("--racelab-expect", action="append", default=[],
                help="KERNEL:SCENARIO=reproduced|window|clean overrides the level the catalog gives the cell")
    g.addoption("--racelab-backend", default="vm", choices=("vm", "netns"),
                help="vm (default) or netns (the host kernel; --racelab-kernels=host)")
    # the default is lab.matrix.DEFAULT_MISSED (a test keeps them equal); not imported here,
    # since this hook runs for every pytest session in the environment
    g.addoption("--racelab-missed", default="fail",
                help="an affected kernel that did not reach its level within the budget: fail its cell "
                     "(default: the catalog says it is affected, so that is news) or skip it; "
                     "as racelab matrix --missed")


def validate_options(config: pytest.Config) -> None:
    """Every bad --racelab-* option named at once, before anything is collected or built
    (pytest.UsageError: exit 4, and no "N tests collected" that could pass for a run)."""
    from lab.config import parse_duration
    from lab.run import BadInput
    from lab.verdict import EXPECT_LEVELS

    kernels = _split(config.getoption("--racelab-kernels"))
    scenarios = _split(config.getoption("--racelab-scenarios"))
    expects = config.getoption("--racelab-expect")
    backend = config.getoption("--racelab-backend")
    missed = config.getoption("--racelab-missed")
    problems = []
    if bool(kernels) != bool(scenarios):
        problems.append("--racelab-kernels and --racelab-scenarios go together: the grid is their product")
    try:
        parse_duration(config.getoption("--racelab-budget"), "--racelab-budget")
    except BadInput as e:
        problems.append(str(e).replace("\n  hint:", ";"))
    from lab.matrix import MISSED_POLICIES
    if missed not in MISSED_POLICIES:
        problems.append(f"--racelab-missed {missed!r}: one of {', '.join(MISSED_POLICIES)} (what an affected "
                        "kernel that misses its level within the budget counts as)")
    if config.getoption("--racelab-vms") < 1:
        problems.append(f"--racelab-vms must be >= 1, got {config.getoption('--racelab-vms')}")
    for k in kernels:
        if backend == "netns" or k == "host":
            if (k == "host") != (backend == "netns"):
                problems.append(f"--racelab-kernels {k}: 'host' (this machine's kernel) goes with "
                                "--racelab-backend=netns, and only it")
            continue
        from lab.kernels import kernel as kmod
        try:
            kmod.resolve(k)
        except BadInput as e:
            problems.append(f"--racelab-kernels {k}: {e}".replace("\n  hint:", ";"))
    from lab import scenario as scen
    for sc in scenarios:
        try:
            scen.find(sc)
        except BadInput as e:
            problems.append(f"--racelab-scenarios {sc}: {e}".replace("\n  hint:", ";"))
    for item in expects:
        key, sep, level = item.partition("=")
        k, colon, sc = key.rpartition(":")
        if not sep or not colon:
            problems.append(f"--racelab-expect {item!r}: expected KERNEL:SCENARIO=LEVEL, "
                            "e.g. 6.1.192:generic-rx-race=clean")
        elif level not in EXPECT_LEVELS:
            problems.append(f"--racelab-expect {item!r}: unknown level {level!r}; one of {', '.join(EXPECT_LEVELS)}")
        elif kernels and (k not in kernels or sc not in scenarios):
            problems.append(f"--racelab-expect {item!r}: no such cell in the grid "
                            f"(kernels {', '.join(kernels)}; scenarios {', '.join(scenarios)})")
    if problems:
        raise pytest.UsageError("racelab: bad option(s):\n  " + "\n  ".join(problems))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "racelab_cell: a kernel x scenario grid cell")
    validate_options(config)
    if config.getoption("--racelab-kernels") and config.getoption("--racelab-scenarios"):
        # the grid alone when no paths were given; the grid too when some were
        if getattr(config, "args_source", None) == pytest.Config.ArgsSource.TESTPATHS:
            config.args[:] = [str(GRID_MODULE)]
        elif str(GRID_MODULE) not in config.args:
            config.args.append(str(GRID_MODULE))


def _split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "racelab_cell" not in metafunc.fixturenames:
        return
    cfg = metafunc.config
    kernels = _split(cfg.getoption("--racelab-kernels"))
    scenarios = _split(cfg.getoption("--racelab-scenarios"))
    cells = [(s, k) for s in scenarios for k in kernels]
    metafunc.parametrize("racelab_cell", cells, ids=[f"{s}-{k}" for s, k in cells], indirect=True)


def expectation(config: pytest.Config, kernel: str, scenario: str) -> str:
    from lab.verdict import EXPECT_LEVELS
    given: list[str] = config.getoption("--racelab-expect")
    for item in given:
        key, _, value = item.partition("=")
        if key == f"{kernel}:{scenario}":
            if value not in EXPECT_LEVELS:
                raise pytest.UsageError(f"--racelab-expect {item!r}: the level must be one of "
                                        f"{', '.join(EXPECT_LEVELS)}, e.g. {key}=window")
            return value
    if kernel == "host":
        return "clean"
    from lab.kernels import kernel as kmod
    from lab.matrix import expected_for
    return expected_for(kmod.resolve(kernel), scenario)


@pytest.fixture
def racelab_cell(request: pytest.FixtureRequest) -> dict[str, Any]:
    """One grid cell: {"scenario", "kernel", "expected", "budget", "vms", "backend", "missed"}."""
    scenario, kernel = request.param
    cfg = request.config
    from lab.config import parse_duration
    return {"scenario": scenario, "kernel": kernel, "expected": expectation(cfg, kernel, scenario),
            "budget": parse_duration(cfg.getoption("--racelab-budget")),
            "vms": cfg.getoption("--racelab-vms"), "backend": cfg.getoption("--racelab-backend"),
            "missed": cfg.getoption("--racelab-missed")}


@pytest.fixture(scope="session")
def racelab_host() -> LocalHost:
    """The local Host: this machine's kernel, for netns-backend scenarios."""
    from lab import dataplane
    from lab.host import LocalHost
    return LocalHost(str(dataplane.build()))


@pytest.fixture(scope="session")
def racelab_kernel() -> Callable[[str], KernelArtifact]:
    """Factory: name -> KernelArtifact.  Builds once per key across xdist workers (file lock)."""
    from lab.kernels import kernel as kmod
    cache: dict[str, KernelArtifact] = {}

    def get(name: str) -> KernelArtifact:
        if name not in cache:
            cache[name] = kmod.ensure(kmod.resolve(name), progress=False)
        return cache[name]
    return get


@pytest.fixture(scope="session")
def racelab_image() -> Image:
    """The guest image (cached by recipe and lab-layer hash)."""
    from lab import image
    return image.ensure_image(progress=False)


@pytest.fixture
def racelab_fleet(racelab_kernel: Callable[[str], KernelArtifact], racelab_image: Image,
                  tmp_path: Path) -> Iterator[Callable[..., list[VM]]]:
    """Factory: (kernel name, n, vcpus=2, memory_mib=1024) -> n booted guests; all destroyed after."""
    from lab import vm as vmmod
    stack = ExitStack()
    counter = [0]

    def boot(kernel_name: str, n: int = 1, vcpus: int = 2, memory_mib: int = 1024,
             cmdline: str = "") -> list[VM]:
        art = racelab_kernel(kernel_name)
        vms = []
        for _ in range(n):
            i = counter[0]
            counter[0] += 1
            m = vmmod.VM(art, racelab_image, name=f"racelab-{os.getpid()}-pytest-{i}", vcpus=vcpus,
                         memory_mib=memory_mib, cmdline=cmdline, pin=None,
                         results_dir=tmp_path / f"vm-{i}")
            vms.append(stack.enter_context(m))
        return vms
    with stack:
        yield boot


@pytest.fixture
def racelab_vm(racelab_fleet: Callable[..., list[VM]]) -> Callable[..., VM]:
    """Factory: kernel name -> one booted guest (destroyed after the test)."""
    def boot(kernel_name: str, **kw: Any) -> VM:
        return racelab_fleet(kernel_name, 1, **kw)[0]
    return boot


@pytest.fixture
def racelab_topology() -> Iterator[Callable[[TopologySpec], Topology]]:
    """Factory: TopologySpec -> Topology in fresh anonymous namespaces (gone after the test)."""
    from lab.agent.topology import build
    stack = ExitStack()

    def make(spec: TopologySpec) -> Topology:
        return stack.enter_context(build(spec))
    with stack:
        yield make
