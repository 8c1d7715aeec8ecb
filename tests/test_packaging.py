"""The wheel ships every subpackage and data file (an editable install hides such mistakes).

Builds a wheel offline from a copy of the sources (so the repository gets no build/
or egg-info debris) and compares it with what is on disk and in pyproject.toml.
"""
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
# directory on disk -> package name, e.g. "passes" -> "tgraph.passes"
PACKAGE_DIRS = {str(Path(d)): name for name, d in SETUPTOOLS.get("package-dir", {}).items()}
SKIP_DIRS = {"__pycache__", "build", "dist"}


def package_of(directory: Path):
    """The package name a source directory is installed as (via package-dir), or None."""
    parts = directory.relative_to(ROOT).parts
    for depth in range(len(parts), 0, -1):
        name = PACKAGE_DIRS.get(str(Path(*parts[:depth])))
        if name is not None:
            return ".".join((name, *parts[depth:]))
    return None


def source_dirs():
    """Every directory under the package roots, skipping caches and build output."""
    for root in sorted({Path(d).parts[0] for d in PACKAGE_DIRS}):
        for here, subdirs, _ in os.walk(ROOT / root):
            subdirs[:] = sorted(d for d in subdirs if d not in SKIP_DIRS and not d.startswith(".")
                                and not d.endswith(".egg-info"))
            yield Path(here)


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory):
    """Names of the files inside a wheel built from a clean copy of the project."""
    work = tmp_path_factory.mktemp("pkg")
    src = work / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist", "*.onnx", "*.onnx.data", "*.npz")
    for entry in ROOT.iterdir():  # top-level files (pyproject, README, LICENSE ...) plus the package roots
        if entry.is_file() and not entry.name.startswith("."):
            shutil.copy2(entry, src / entry.name)
    for root in {Path(d).parts[0] for d in PACKAGE_DIRS}:
        shutil.copytree(ROOT / root, src / root, ignore=ignore)
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "-w", str(work / "out"), str(src)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels = list((work / "out").glob("tgraph-*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as zf:
        return set(zf.namelist())


def test_pyproject_maps_the_fixed_layout():
    assert PACKAGE_DIRS == {"tgraph": "tgraph", "passes": "tgraph.passes", "codegen": "tgraph.codegen"}


def test_every_package_directory_is_listed():
    """A new subpackage with an __init__.py must be added to [tool.setuptools] packages."""
    on_disk = {package_of(d) for d in source_dirs() if (d / "__init__.py").is_file()}
    listed = set(SETUPTOOLS["packages"])
    assert not on_disk - listed, f"packages missing from pyproject.toml: {sorted(on_disk - listed)}"
    assert not listed - on_disk, f"pyproject.toml lists packages with no __init__.py: {sorted(listed - on_disk)}"


def test_no_python_files_outside_packages():
    """A .py file in a directory without __init__.py would silently not be installed."""
    stray = [str(d.relative_to(ROOT)) for d in source_dirs()
             if any(d.glob("*.py")) and not (d / "__init__.py").is_file()]
    assert not stray, f"directories with .py files but no __init__.py: {stray}"


def test_wheel_contains_key_files(wheel_files):
    for name in ["tgraph/__init__.py", "tgraph/errors.py", "tgraph/ir/core.py", "tgraph/runtime/session.py",
                 "tgraph/passes/__init__.py", "tgraph/codegen/__init__.py", "tgraph/codegen/onnx/__init__.py",
                 "tgraph/codegen/numpy/__init__.py"]:
        assert name in wheel_files, name
    shipped = {n for n in wheel_files if n.startswith("tgraph/codegen/numpy/templates/") and n.endswith(".j2")}
    on_disk = {f"tgraph/codegen/numpy/templates/{p.name}" for p in (ROOT / "codegen/numpy/templates").glob("*.j2")}
    assert on_disk, "codegen/numpy/templates/ has no *.j2 templates"
    assert shipped == on_disk


def test_wheel_ships_every_source_file(wheel_files):
    """Every .py file and every file matched by package-data ends up in the wheel."""
    data = SETUPTOOLS.get("package-data", {})
    missing = []
    for directory in source_dirs():
        package = package_of(directory)
        if not (directory / "__init__.py").is_file():
            continue
        prefix = package.replace(".", "/")
        wanted = list(directory.glob("*.py"))
        for pattern in data.get(package, []):
            wanted += [p for p in directory.glob(pattern) if p.is_file()]
        missing += [f"{prefix}/{p.relative_to(directory).as_posix()}" for p in wanted
                    if f"{prefix}/{p.relative_to(directory).as_posix()}" not in wheel_files]
    assert not missing, f"not in the wheel: {missing}"


def test_console_script_target_is_shipped(wheel_files):
    entry_points = [n for n in wheel_files if n.endswith(".dist-info/entry_points.txt")]
    assert entry_points, "the wheel declares no entry points"
    for script, target in PYPROJECT["project"].get("scripts", {}).items():
        module = target.split(":")[0].replace(".", "/")
        assert f"{module}.py" in wheel_files or f"{module}/__init__.py" in wheel_files, \
            f"console script {script!r} points at {target}, which is not in the wheel"
