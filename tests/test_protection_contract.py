"""The protection contract suite (:mod:`tsqp_core.testing.protection_contract`, shipped in
the package for plugin authors), run against every registered protection scheme."""

from tsqp_core.testing.protection_contract import *  # noqa: F401,F403
