"""The optional C part of tsqp-core (``tsqp_core.tee._bounds``, the value check's inner loop):
built where a C compiler and Python's headers are at hand; without it the check runs in
torch, with the same answers."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("tsqp_core.tee._bounds",
                             sources=["tsqp_core/tee/_bounds.c"],
                             extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wextra",
                                                 "-Wno-unused-parameter",
                                                 "-Wno-missing-field-initializers"],
                             libraries=["m"],
                             optional=True)])
