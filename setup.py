"""Builds the compiled engine (Cython) with ``pip install .``; everything else is in pyproject.toml.

The extension is optional: where it cannot be built (no C compiler), the install still succeeds
and portside runs on its pure-Python engine, saying so in one log line at start.
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [Extension("portside.engine._compiled", ["src/portside/engine/_compiled.pyx"],
                   extra_compile_args=["-O2"], optional=True)],
        compiler_directives={"language_level": "3"},
    ),
)
