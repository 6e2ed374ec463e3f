"""The optional C part of the shm transport (``tsqp_transport_shm._native``): built where a C
compiler and Python's headers are at hand; without it the transport runs its Python path."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("tsqp_transport_shm._native",
                             sources=["tsqp_transport_shm/_native.c"],
                             extra_compile_args=["-O2", "-std=c11", "-D_GNU_SOURCE",
                                                 "-Wall", "-Wextra", "-Wno-unused-parameter",
                                                 "-Wno-missing-field-initializers"],
                             optional=True)])
