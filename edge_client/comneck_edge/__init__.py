"""ComNeck edge client: image -> ELIC analysis + entropy coding -> bitstream.

Imports only the codec side of ``comneck`` (torch, compressai, pillow, numpy): no
server, CLIP or LLM dependencies.
"""

from .encoder import EdgeEncoder, EncodedImage

__all__ = ["EdgeEncoder", "EncodedImage"]
