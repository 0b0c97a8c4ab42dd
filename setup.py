"""Build of the optional compiled kernels of bhvit.runtime (metadata lives in pyproject.toml).

``bhvit/runtime/csrc/`` is plain C (no Python API): the kernels and the whole-network
plan of libbhvit, loaded with ctypes by ``bhvit/runtime/kernels.py`` (the ``Makefile``
builds the same sources as a standalone C library).  The extension is optional: if it does not compile,
the install still succeeds and the kernels fall back to numpy.  It is built
without -march=native (SIMD paths are chosen at run time), with OpenMP when the
compiler supports it.  Rebuild in place with ``python setup.py build_ext --inplace``.
"""

from glob import glob

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPENMP = ["-fopenmp"]


class BuildBitops(build_ext):
    """Retry without OpenMP if the compiler or linker rejects -fopenmp."""

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception:
            if not any(f in ext.extra_compile_args for f in OPENMP):
                raise
            self.warn(f"building {ext.name} with OpenMP failed; retrying single-threaded")
            ext.extra_compile_args = [f for f in ext.extra_compile_args if f not in OPENMP]
            ext.extra_link_args = [f for f in ext.extra_link_args if f not in OPENMP]
            super().build_extension(ext)


setup(
    ext_modules=[
        Extension(
            "bhvit.runtime._bitops",
            sources=sorted(f for f in glob("bhvit/runtime/csrc/*.c") if not f.endswith("bhvit_run.c")),
            depends=sorted(glob("bhvit/runtime/csrc/*.h")),
            extra_compile_args=[
                *"-O3 -std=gnu11 -ffp-contract=off -fno-trapping-math -fvisibility=hidden".split(),
                *OPENMP,
            ],
            extra_link_args=OPENMP,
            libraries=["m"],
            optional=True,
        )
    ],
    cmdclass={"build_ext": BuildBitops},
)
