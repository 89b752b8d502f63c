"""Builds the compiled engine and RESP framer (Cython) with ``pip install .``; everything else is
in pyproject.toml.

The extensions are optional: where they cannot be built (no C compiler), the install still
succeeds and portside runs on its pure-Python engine (saying so in one log line at start) and
its pure-Python RESP framer.
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [Extension("portside.engine._compiled", ["src/portside/engine/_compiled.pyx"],
                   extra_compile_args=["-O2"], optional=True),
         Extension("portside.protocols._resp", ["src/portside/protocols/_resp.pyx"],
                   extra_compile_args=["-O2"], optional=True)],
        compiler_directives={"language_level": "3"},
    ),
)
