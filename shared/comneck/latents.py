"""Entropy-coded latents as both edges hand them to the container (no torch needed)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EncodedLatents:
    """Entropy-coded latents of a batch: CompressAI's strings, indexed [stream][batch item].

    ELIC writes ``2 * groups + 1`` streams: an anchor and a non-anchor (checkerboard)
    pass per channel group, then the hyper-latent z. mbt2018-mean writes two: y, then z.
    """

    strings: list[list[bytes]]
    padded_size: tuple[int, int]
    #: True: the entropy parameters were evaluated in fixed point (:mod:`comneck.fixed_point`),
    #: so any machine decodes the same symbols; False: CompressAI's float path.
    fixed_point: bool = False

    @property
    def batch_size(self) -> int:
        return len(self.strings[0])

    @property
    def num_bytes(self) -> int:
        return sum(len(s) for stream in self.strings for s in stream)

    def item(self, index: int) -> "EncodedLatents":
        """The latents of one image of the batch."""
        return EncodedLatents([[stream[index]] for stream in self.strings], self.padded_size, self.fixed_point)
