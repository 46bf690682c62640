"""ComNeck edge client: image -> ELIC analysis + entropy coding -> bitstream -> POST /infer.

Imports only the codec side of ``comneck`` (torch, compressai, pillow, numpy): no
server, CLIP or LLM dependencies::

    import comneck_edge
    data = comneck_edge.encode("photo.jpg", preset="tiny")   # bytes to POST to /infer
"""


from __future__ import annotations

import importlib
from typing import Any

# Each name is imported on first use (PEP 562), so that ``comneck-edge --help`` and the HTTP
# client do not wait seconds for torch.
_HOMES = {"EdgeEncoder": "encoder", "EncodedImage": "encoded", "encode": "encoder",
          "GatewayClient": "client", "GatewayError": "client"}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
