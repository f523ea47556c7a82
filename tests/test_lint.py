"""mypy (strict on lab/, lenient on tests/) and ruff, as configured in pyproject.toml, are clean.

They run here so that the suite CI runs (./bootstrap test) holds the code to them.
"""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from lab.run import cache_dir

ROOT = Path(__file__).resolve().parent.parent


def _tool(module: str, *args: str) -> subprocess.CompletedProcess:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} missing: ./bootstrap install (pip install -e '.[dev]')")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_mypy_is_clean():
    # the files and flags come from [tool.mypy]; the cache lives with racelab's, not in the tree
    p = _tool("mypy", "--cache-dir", str(cache_dir() / "mypy"))
    assert p.returncode == 0, f"mypy:\n{p.stdout}{p.stderr}"


def test_ruff_is_clean():
    p = _tool("ruff", "check", "--no-cache", "lab", "tests")
    assert p.returncode == 0, f"ruff:\n{p.stdout}{p.stderr}"


def test_lab_is_checked_with_every_strict_flag():
    """[tool.mypy] cannot say `strict` for lab/ alone, so it lists the flags: all that
    `mypy --strict` sets, in the lab override or for every module."""
    import tomllib
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy missing: ./bootstrap install (pip install -e '.[dev]')")
    from mypy.main import define_options

    _, _, strict = define_options()           # [(dest, value)] that --strict assigns

    def settings(section: dict) -> set[tuple[str, bool]]:
        return {(k[3:], not v) if k.startswith("no_") else (k, v) for k, v in section.items() if isinstance(v, bool)}

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    (lab,) = [o for o in cfg["overrides"] if "lab.*" in o["module"]]
    missing = set(strict) - settings(lab) - settings(cfg)
    assert not missing, f"set for lab/ as --strict does: {sorted(missing)}"
