"""ComNeck edge client: image -> ELIC analysis + entropy coding -> bitstream -> POST /infer.

Imports only the codec side of ``comneck`` (torch, compressai, pillow, numpy): no
server, CLIP or LLM dependencies::

    import comneck_edge
    data = comneck_edge.encode("photo.jpg", preset="tiny")   # bytes to POST to /infer
"""

from .client import GatewayClient, GatewayError
from .encoder import EdgeEncoder, EncodedImage, encode

__all__ = ["EdgeEncoder", "EncodedImage", "GatewayClient", "GatewayError", "encode"]
