"""The layout stays what docs/architecture.md says: every module named there, every
package in pyproject.toml, and every lab import of bench/ resolving."""
import ast
import importlib
import tomllib

from lab.run import project_root

ROOT = project_root()
LAB = ROOT / "lab"


def _modules() -> list[str]:
    return sorted(p.relative_to(ROOT).as_posix() for p in LAB.rglob("*.py") if "__pycache__" not in p.parts)


def test_the_architecture_page_names_every_module():
    page = (ROOT / "docs" / "architecture.md").read_text()
    missing = [m for m in _modules() if f"`{m}`" not in page]
    assert not missing, f"docs/architecture.md does not name: {missing}"
    assert "lab/agent/agent.py" in _modules()      # the walk finds subpackages


def test_pyproject_lists_every_package():
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    dirs = {p.parent for p in LAB.rglob("*") if p.is_file() and "__pycache__" not in p.parts
            and p.suffix in (".py", ".json")}
    want = sorted(".".join(d.relative_to(ROOT).parts) for d in dirs)
    assert sorted(packages) == want


def _in_tree(module: str) -> bool:
    # on disk here: an installed copy of racelab elsewhere could answer an import too
    p = ROOT.joinpath(*module.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _lab_imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "lab":
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            yield from ((a.name, []) for a in node.names if a.name.split(".")[0] == "lab")


def test_lab_imports_of_bench_tests_and_lab_exist_in_this_tree():
    # `bench/X --help` exits before its lazy imports, so the imports are checked by name
    scripts = [p for p in sorted((ROOT / "bench").iterdir())
               if p.is_file() and p.read_text().splitlines()[0].startswith("#!") and "python" in
               p.read_text().splitlines()[0]]
    assert scripts
    problems = []
    for path in [*scripts, *sorted(LAB.rglob("*.py")), *sorted((ROOT / "tests").glob("*.py"))]:
        for module, names in _lab_imports(path):
            if not _in_tree(module):
                problems.append(f"{path.relative_to(ROOT)}: {module}")
                continue
            mod = importlib.import_module(module)
            problems += [f"{path.relative_to(ROOT)}: {module}.{n}" for n in names
                         if not _in_tree(f"{module}.{n}") and not hasattr(mod, n)]
    assert not problems
