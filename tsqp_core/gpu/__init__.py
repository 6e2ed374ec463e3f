"""The GPU side: the server and the backends it runs. Never imported by the TEE side (a test
checks); the wire protocol both sides speak is :mod:`tsqp_core.protocol`."""
