"""tsqp: privacy-preserving split inference of LLaMA-family models between a TEE and a GPU.

Plugins import :data:`hookimpl` from here and never import pluggy themselves::

    from tsqp_core import hookimpl

    @hookimpl
    def tsqp_register_transports(register):
        register(MyTransport)
"""

import pluggy

__version__ = "0.1.0"

PROJECT = "tsqp"
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = ["PROJECT", "hookimpl", "__version__"]
