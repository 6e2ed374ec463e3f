"""The built-in implementations, registered through the same hooks as any plugin."""

from __future__ import annotations

from tsqp_core import hookimpl
from tsqp_core.executor import UnfusedExecutor
from tsqp_core.inproc import InprocTransport
from tsqp_core.partition import (AttnMlpPartition, CustomPartition, LayerPartition,
                                  LinearsPartition, SeedPartition)
from tsqp_core.protection.none import NoProtection
from tsqp_core.protection.otp import OtpProtection
from tsqp_core.protection.verify import VerifyProtection
from tsqp_core.tee_ops import TorchTeeOps


@hookimpl
def tsqp_register_transports(register):
    register(InprocTransport)


@hookimpl
def tsqp_register_executors(register):
    register(UnfusedExecutor)


@hookimpl
def tsqp_register_tee_ops(register):
    register(TorchTeeOps)


@hookimpl
def tsqp_register_partitions(register):
    for cls in (SeedPartition, AttnMlpPartition, LayerPartition, LinearsPartition,
                CustomPartition):
        register(cls)


@hookimpl
def tsqp_register_protections(register):
    register(NoProtection)
    register(OtpProtection)
    register(VerifyProtection)
