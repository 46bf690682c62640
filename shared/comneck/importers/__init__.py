"""Weights from the layouts they are published in, onto ComNeck's networks.

``reading`` opens files safely, ``elic`` and ``compressai_zoo`` map codec keys, ``clip`` maps CLIP keys, ``sources``
says which file holds which network, ``fitting`` loads with every bad key listed, and
``convert`` writes our safetensors layout (``comneck convert``).
"""
