"""How portside installs: without a C compiler, and on a CPython the compiled engine was not
tested on, it installs and runs its pure-Python engine, saying why; never undefined behaviour.

These build for real (pip without build isolation, the toolchain of this venv; gcc and Cython),
into temporary directories, never into the checkout.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: What a build needs of the checkout (no build outputs: the copy builds from the sources).
_NOT_COPIED = shutil.ignore_patterns("*.so", "*.c", "__pycache__", "*.egg-info", "build")


def _setup_py() -> ModuleType:
    """setup.py's helpers (importing it does not run ``setup()``)."""
    spec = importlib.util.spec_from_file_location("portside_setup", ROOT / "setup.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _copy_sources(into: Path) -> Path:
    into.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, into / name)
    shutil.copytree(ROOT / "src", into / "src", ignore=_NOT_COPIED)
    return into


def _venv_with_this_toolchain(path: Path) -> Path:
    """A fresh venv that sees this one's packages (setuptools, Cython, pip, the dependencies)
    after its own, so pip installs portside into it without the network; its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                          "['purelib'])"], check=True, capture_output=True, text=True)
    # Plain paths, not site dirs: this venv's editable portside (a .pth there) stays out.
    Path(own.stdout.strip(), "outer.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


def test_pip_install_without_a_c_compiler_installs_the_pure_engine(tmp_path: Path) -> None:
    source = _copy_sources(tmp_path / "portside")
    python = _venv_with_this_toolchain(tmp_path / "venv")
    env = {**os.environ, "CC": "/bin/false", "CXX": "/bin/false", "LDSHARED": "/bin/false",
           "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    build = subprocess.run(
        [str(python), "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps",
         "--no-index", str(source)],
        env=env, capture_output=True, text=True, timeout=240)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    notes = [line.strip() for line in (build.stdout + build.stderr).splitlines()
             if line.strip().startswith("portside: ")]
    # One line per extension, naming it.
    extensions = ["portside.engine._compiled", "portside.protocols._resp",
                  "portside.examples._resp_store"]
    assert len(notes) == len(extensions), notes
    for name in extensions:
        assert any(f"{name} not built" in line for line in notes), (name, notes)
    installed = subprocess.run([str(python), "-c", "import portside, os; "
                                "print(os.path.dirname(portside.__file__))"],
                               env=env, capture_output=True, text=True, check=True)
    package = Path(installed.stdout.strip())
    assert package.is_relative_to(tmp_path / "venv"), package
    assert not list(package.rglob("*.so"))
    version = subprocess.run([str(tmp_path / "venv" / "bin" / "portside"), "--version"],
                             env=env, capture_output=True, text=True, timeout=60)
    assert version.returncode == 0, version.stderr
    assert ", engine epoll (compiled engine unavailable: " in version.stdout, version.stdout


def test_the_compiled_engine_is_built_only_for_the_declared_pythons() -> None:
    """setup.py reads the versions from pyproject.toml's classifiers, the one declaration."""
    setup = _setup_py()
    versions = setup.supported_pythons()
    assert versions[0] == (3, 11) and len(versions) >= 3
    assert versions == [(3, minor) for minor in range(11, 11 + len(versions))]
    assert setup.engine_unsupported(versions[0]) == ""
    assert setup.engine_unsupported(versions[-1]) == ""
    first, last = versions[0], versions[-1]
    for outside in ((first[0], first[1] - 1), (last[0], last[1] + 1)):
        assert "is not among the tested" in setup.engine_unsupported(outside)
    macros = dict(setup.version_macros())
    assert macros["PORTSIDE_PY_FIRST"] == "0x030B0000"
    assert macros["PORTSIDE_PY_END"] == f"0x03{last[1] + 1:02X}0000"


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is missing (scripts/test installs it)")
def test_an_engine_built_for_another_python_refuses_to_import_and_auto_runs_epoll(
        tmp_path: Path) -> None:
    """The compile-time check: ``_compiled.pyx`` built with a supported range that leaves out
    this interpreter does not import (before touching CPython's private structs); ``auto``
    then runs epoll and says why in one line, and ``--version`` says so too."""
    package = tmp_path / "site"
    shutil.copytree(ROOT / "src" / "portside", package / "portside", ignore=_NOT_COPIED)
    pyx = package / "portside" / "engine" / "_compiled.pyx"
    c_file = pyx.with_suffix(".c")
    subprocess.run([sys.executable, "-m", "cython", "-3", str(pyx), "-o", str(c_file)],
                   check=True, timeout=240)  # Cython: a test dependency
    major, minor = sys.version_info[:2]
    extension = pyx.with_name("_compiled" + sysconfig.get_config_var("EXT_SUFFIX"))
    subprocess.run(
        ["gcc", "-O0", "-shared", "-fPIC", "-w", f"-I{sysconfig.get_paths()['include']}",
         f"-DPORTSIDE_PY_FIRST=0x{major:02X}{minor + 1:02X}0000",
         f"-DPORTSIDE_PY_END=0x{major:02X}{minor + 3:02X}0000",
         f'-DPORTSIDE_PYTHONS="{major}.{minor + 1}-{major}.{minor + 2}"',
         str(c_file), "-o", str(extension)], check=True, timeout=240)
    env = {**os.environ, "PYTHONPATH": str(package)}
    tested = f"{major}.{minor + 1}-{major}.{minor + 2}"
    why = (f"the compiled engine is unsupported here: built for CPython "
           f"{sys.version.split()[0]}, not among the tested {tested}")
    probe = subprocess.run([sys.executable, "-c", (
        "import logging, portside\n"
        "logging.basicConfig(format='%(message)s')\n"
        "from portside.config import Engine\n"
        "from portside.server import resolve_engine\n"
        "assert portside.__file__.startswith(" + repr(str(package)) + "), portside.__file__\n"
        "print(resolve_engine(Engine.AUTO).value, resolve_engine(Engine.AUTO).value)\n")],
        env=env, capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["epoll", "epoll"]
    assert probe.stderr.splitlines() == [
        f"compiled engine unavailable ({why}); using the pure-Python epoll engine"]
    version = subprocess.run([sys.executable, "-m", "portside", "--version"], env=env,
                             capture_output=True, text=True, timeout=60)
    assert f"engine epoll (compiled engine unavailable: {why})" in version.stdout, version


def test_without_cython_setup_py_builds_no_extension_and_says_so() -> None:
    """``--no-build-isolation`` where Cython is not installed: pure Python, in one line."""
    probe = ("import sys, importlib.util\n"
             "sys.modules['Cython'] = sys.modules['Cython.Build'] = None  # not installed\n"
             f"spec = importlib.util.spec_from_file_location('s', {str(ROOT / 'setup.py')!r})\n"
             "module = importlib.util.module_from_spec(spec)\n"
             "spec.loader.exec_module(module)\n"
             "print(module.extensions())\n")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
    assert run.stderr.splitlines() == [
        "portside: Cython is not installed: no compiled extensions; portside runs in pure Python"]
