"""The transport contract suite (:mod:`tsqp_core.testing.transport_contract`, shipped in the
package for plugin authors), run against every registered transport."""

from tsqp_core.testing.transport_contract import *  # noqa: F401,F403
