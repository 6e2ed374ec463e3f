"""The optional C parts of tsqp-core, built where a C compiler and Python's headers are at
hand; without them the same work runs in torch, with the same answers:

- ``tsqp_core.tee._bounds``: the value check's inner loop;
- ``tsqp_core.tee._rope``: RoPE for small tensors (the ``torch`` TEE ops' rotation).
"""

from setuptools import Extension, setup

FLAGS = ["-O3", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter",
         "-Wno-missing-field-initializers"]

setup(ext_modules=[
    Extension("tsqp_core.tee._bounds", sources=["tsqp_core/tee/_bounds.c"],
              extra_compile_args=FLAGS, libraries=["m"], optional=True),
    # each product and sum rounded on its own, as torch rounds them: no fused multiply-add
    Extension("tsqp_core.tee._rope", sources=["tsqp_core/tee/_rope.c"],
              extra_compile_args=[*FLAGS, "-ffp-contract=off"], optional=True),
])
