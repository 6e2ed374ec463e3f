"""The protection family: what a call's tensors become before they leave the TEE and what
the reply must satisfy before the TEE uses it. The contract is :mod:`.base`; ``none`` ships
plaintext."""

from tsqp_core.protection.base import (CallSite, ForwardShape, IntegrityError, Protection,
                                       ProtectionRefused, PublicWeights, TeeContext)
from tsqp_core.protection.none import NoProtection
from tsqp_core.protection.random import SecureRandom

__all__ = ["CallSite", "ForwardShape", "IntegrityError", "NoProtection", "Protection",
           "ProtectionRefused", "PublicWeights", "SecureRandom", "TeeContext"]
