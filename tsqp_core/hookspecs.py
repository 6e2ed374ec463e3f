"""The plugin hooks of tsqp: the manual for anyone shipping a transport, executor, TEE-op
library, partition or protection scheme as a pip package.

A plugin is a module (or object) exposed under the entry-point group ``tsqp``::

    [project.entry-points.tsqp]
    mytransport = "my_package.plugin"

Every hook is a *registry hook*: it receives a ``register`` callable and calls it once per
implementation it provides. The core owns lookup, name clashes and the "unknown name, choose
one of: ..." error. Each implementation is a class with

* ``name: ClassVar[str]`` -- the name users select it by (``transport=NAME``),
* ``Options: ClassVar[type[pydantic.BaseModel]]`` -- its own options, validated with unknown
  keys rejected (use :class:`tsqp_core.plugins.PluginOptions` as the base),
* a constructor taking one validated ``Options`` instance.

The abstract base classes each family must implement live in :mod:`tsqp_core.transport`,
:mod:`tsqp_core.executor`, :mod:`tsqp_core.tee_ops`, :mod:`tsqp_core.partition` and
:mod:`tsqp_core.protection`. Plugin modules are imported in both processes (TEE and GPU side),
so importing one must be cheap and must not touch CUDA; import heavy GPU code lazily.
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

from tsqp_core import PROJECT

hookspec = pluggy.HookspecMarker(PROJECT)

Register = Callable[[type[Any]], None]


# --- moving bytes -----------------------------------------------------------------------


@hookspec
def tsqp_register_transports(register: Register) -> None:
    """Register :class:`tsqp_core.transport.Transport` subclasses.

    Called once, when the plugin manager is first built, in both processes.
    ``register(cls)`` adds ``cls`` under ``cls.name``; registering a name twice is an error
    that names both providers. Returns nothing.
    """


# --- computing on the GPU side ------------------------------------------------------------


@hookspec
def tsqp_register_executors(register: Register) -> None:
    """Register :class:`tsqp_core.executor.Executor` subclasses.

    An executor decides how the GPU-side ops of a partition group into calls (client side,
    :meth:`Executor.group`) and how a call runs on the GPU side (:meth:`Executor.backend`).
    Called once per process. Returns nothing.
    """


# --- computing on the TEE side ------------------------------------------------------------


@hookspec
def tsqp_register_tee_ops(register: Register) -> None:
    """Register :class:`tsqp_core.tee_ops.TeeOps` subclasses: implementations of the ops a
    partition keeps on the TEE side (RMSNorm, RoPE, softmax with causal mask, SiLU*up, ...).
    Called once per process. Returns nothing.
    """


# --- deciding what runs where --------------------------------------------------------------


@hookspec
def tsqp_register_partitions(register: Register) -> None:
    """Register :class:`tsqp_core.partition.Partition` subclasses: which op of the forward
    graph runs on the GPU side. Called once per process. Returns nothing.
    """


@hookspec
def tsqp_register_protections(register: Register) -> None:
    """Register :class:`tsqp_core.protection.Protection` subclasses: what happens to a tensor
    before it leaves the TEE and after its result returns. Called once per process.
    Returns nothing.
    """
