"""Builds the compiled engine, the compiled RESP framer and the RESP example's fast path
(Cython) with ``pip install .``; everything else is in pyproject.toml.

The extensions are optional, and really so: where Cython is missing (``--no-build-isolation``
without it), no C compiler runs, or the compiled engine does not support the interpreter, the
install still succeeds, saying so in one line per extension, and portside runs on its
pure-Python engine (saying so in one log line at start) and its pure-Python RESP framer.

The compiled engine reads CPython's private memoryview structs, so it is built only for the
CPython versions pyproject.toml's classifiers name (the one declaration), with the GIL; the
versions are also compiled into it, and it refuses to import anywhere else (``_compiled.pyx``).
"""

from __future__ import annotations

import re
import sys
import sysconfig
import tomllib
from pathlib import Path
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent


def supported_pythons() -> list[tuple[int, int]]:
    """The CPython versions the compiled engine is built for: pyproject.toml's
    ``Programming Language :: Python :: 3.N`` classifiers, oldest first."""
    with open(HERE / "pyproject.toml", "rb") as file:
        classifiers = tomllib.load(file)["project"]["classifiers"]
    found = (re.fullmatch(r"Programming Language :: Python :: (\d+)\.(\d+)", c)
             for c in classifiers)
    return sorted((int(m[1]), int(m[2])) for m in found if m)


def engine_unsupported(version: tuple[int, int] = sys.version_info[:2]) -> str:
    """Why the compiled engine is not built for this interpreter ("" where it is)."""
    first, last = supported_pythons()[0], supported_pythons()[-1]
    if sys.implementation.name != "cpython":
        return f"{sys.implementation.name} is not CPython"
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        return "free-threaded CPython is not supported"
    if not first <= version <= last:
        return (f"CPython {version[0]}.{version[1]} is not among the tested "
                f"{first[0]}.{first[1]}-{last[0]}.{last[1]}")
    return ""


def version_macros() -> list[tuple[str, str | None]]:
    """The supported range, for ``_compiled.pyx``'s compile-time check."""
    first, last = supported_pythons()[0], supported_pythons()[-1]
    return [("PORTSIDE_PY_FIRST", f"0x{first[0]:02X}{first[1]:02X}0000"),
            ("PORTSIDE_PY_END", f"0x{last[0]:02X}{last[1] + 1:02X}0000"),
            ("PORTSIDE_PYTHONS", f'"{first[0]}.{first[1]}-{last[0]}.{last[1]}"')]


def note(text: str) -> None:
    print(f"portside: {text}", file=sys.stderr, flush=True)


def short(exc: BaseException) -> str:
    """An error in a few words (a compiler's failure quotes its whole command line)."""
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return text if len(text) <= 160 else text[:157] + "..."


class OptionalBuildExt(build_ext):
    """``build_ext`` where an extension that fails to build (no compiler, a compile or link
    error, or any other failure of the toolchain) is left out, in one line."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # e.g. no compiler found while setting one up
            note(f"compiled extensions not built ({short(exc)}); portside runs in pure Python")

    def build_extension(self, ext: Any) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            note(f"{ext.name} not built ({short(exc)}); its pure-Python counterpart runs instead")


def extensions() -> list[Any]:
    """The extensions this interpreter gets (Cython-generated), each optional."""
    try:
        from Cython.Build import cythonize
    except ImportError:
        note("Cython is not installed: no compiled extensions; portside runs in pure Python")
        return []
    wanted = [Extension("portside.protocols._resp", ["src/portside/protocols/_resp.pyx"],
                        extra_compile_args=["-O2"], optional=True),
              # The RESP example's own fast path: a compiled subclass of the framer above.
              Extension("portside.examples._resp_store",
                        ["src/portside/examples/_resp_store.pyx"],
                        extra_compile_args=["-O2"], optional=True)]
    if why := engine_unsupported():
        note(f"compiled engine not built: {why}; portside runs its pure-Python engine")
    else:
        wanted.append(Extension("portside.engine._compiled",
                                ["src/portside/engine/_compiled.pyx"],
                                define_macros=version_macros(), extra_compile_args=["-O2"],
                                optional=True))
    try:
        built: list[Any] = cythonize(wanted, compiler_directives={"language_level": "3"},
                                     include_path=["src"])  # _resp.pxd, for the example
    except Exception as exc:
        note(f"Cython failed ({short(exc)}): no compiled extensions; portside runs in pure Python")
        return []
    return built


if __name__ == "__main__":  # as pip's build backend runs it; tests import the helpers
    setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
