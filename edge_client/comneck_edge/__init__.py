"""ComNeck edge client: image -> ELIC analysis + entropy coding -> bitstream -> POST /infer.

Imports only the codec side of ``comneck`` (torch, compressai, pillow, numpy): no
server, CLIP or LLM dependencies.
"""

from .client import GatewayClient, GatewayError
from .encoder import EdgeEncoder, EncodedImage

__all__ = ["EdgeEncoder", "EncodedImage", "GatewayClient", "GatewayError"]
