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

A plugin package also ships its config group file, ``conf/<family>/<name>.yaml`` (``name``
and ``options`` with their defaults) inside the package its entry point names, as package
data; installed, ``<family>=<name>`` selects it (:mod:`tsqp_core.configs`). Its contract
suite runs with ``python -m tsqp_core contract <family> <name>`` (:mod:`tsqp_core.testing`),
and ``python -m tsqp_core new-plugin <family> <name>`` writes a working package with all of
this to start from.

The abstract base classes each family must implement live in :mod:`tsqp_core.transport`,
:mod:`tsqp_core.executor`, :mod:`tsqp_core.tee_ops`, :mod:`tsqp_core.partition` and
:mod:`tsqp_core.protection`. Plugin modules are imported in both processes (TEE and GPU side),
so importing one must be cheap and must not touch CUDA; import heavy GPU code lazily (the TEE
side never imports :mod:`tsqp_core.gpu`, an executor's backend or CUDA: a test checks).

How a call crosses, end to end (the seam every family plugs into)::

    TEE side                                                GPU side
    SplitModel.forward walks the Schedule
      TEE op  -> TeeOps implementation
      Call    -> CallSite(call, wire, session, forward, past, batch, tokens, last_only)
                 Protection.seal(site, values)  -> wire tensors   [breakdown: protect]
                 RemoteGpu.call: protocol.CallRequest + tensors   [serialize, transport]
                   -- transport (a call frame) -->               GpuServer: check the
                                                                  tensors against the plan's
                                                                  wire layout, run
                                                                  Protection.gpu_backend(
                                                                  Executor.backend)  [gpu_compute]
                   <-- protocol.CallReply + tensors --
                 reply checked against the wire layout
                 Protection.open(site, wire) -> values, or IntegrityError   [protect]

The wire layout of every call (:class:`tsqp_core.protocol.CallWire`, declared by
:meth:`Protection.wire`) and the executor's grouping (:attr:`Executor.grouping`, declared
data) are agreed at ``hello``, before the first call.
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

    An executor declares how the GPU-side ops of a partition group into calls
    (``grouping = "op"`` or ``"run"``: data the TEE side plans with, without importing the
    executor) and how a call runs on the GPU side (:meth:`Executor.backend`, returning a
    :class:`tsqp_core.executor.Backend` whose ``run(call, env, cache, last_only)`` adds the
    call's outputs to ``env`` and whose ``info()`` names the attention kernel it uses).
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
    """Register :class:`tsqp_core.protection.Protection` subclasses: what a call's tensors
    become before they leave the TEE and what its reply must satisfy. Called once per
    process (both sides: the GPU side builds a scheme's ``gpu_backend`` from the name and
    options the client sends at ``hello``). Returns nothing.

    The contract (:mod:`tsqp_core.protection.base`): ``check(schedule)`` refuses a schedule
    it cannot protect (:class:`~tsqp_core.protection.ProtectionRefused`, naming the ops);
    ``wire(call, plain)`` declares the tensors that cross -- a pure function of the call and
    the options, recomputed by the GPU side; ``bind(ctx)`` receives a
    :class:`~tsqp_core.protection.TeeContext` (dims, dtype, schedule, a CSPRNG, lazy public
    weights); ``precompute(forwards)`` runs outside the timed region (reported ``offline``);
    ``seal(site, values)`` / ``open(site, wire)`` run per call (timed as ``protect``),
    ``open`` raising :class:`~tsqp_core.protection.IntegrityError` on a reply that does not
    verify; ``seen_as(value, how)`` feeds the exposure report; ``report()`` the
    ``protection`` section of ``results.json``; ``gpu_backend(inner, ...)`` is the optional
    GPU-side part. Class attributes: ``deterministic``, ``tolerance`` (max |Δlogit| against
    the unprotected run, by dtype), ``threat_model``. The contract suite
    (:mod:`tsqp_core.testing.protection_contract`) runs every registered scheme on every
    partition.
    """
