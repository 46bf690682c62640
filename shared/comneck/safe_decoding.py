"""Checks around CompressAI's rANS decoder, which trusts its input.

The decoder reads on past the end of a stream that holds fewer symbols than the latent grid
needs (a crash, or bytes it does not own: the same container then decodes differently from
one run to the next). Decoding is made a pure function of the container's bytes here:

* every stream must hold at least the coder's flushed 64-bit state;
* every stream is followed by zero bytes, as many as decoding its symbols can read
  (:func:`reads_bound`), so the decoder never reads memory it does not own;
* what each decoder call returns is encoded again at once: only the exact bytes the encoder
  writes for those symbols are accepted, so a cut stream (which ate into the zeros) or an
  altered one is refused with ``corrupt_bitstream``.

Re-encoding costs one rANS encoding of the symbols (no network runs again); the cost is
measured by ``benchmarks/bench_decoding.py``. Written here rather than taken from a library:
the streams are CompressAI's own format, which no bounds-checked coder reads.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from .errors import ComneckInputError, ErrorCode

#: CompressAI's coder (Rans64) ends every stream with its 64-bit state.
RANS_STATE_BYTES = 8
#: Largest symbol magnitude accepted: far beyond what ELIC's analysis produces (hundreds); larger
#: ones come only from forged escape codes, and encoding them again would not end.
MAX_SYMBOL = 2**24

_active = threading.local()


def reads_bound(symbols: int) -> int:
    """Bytes past a stream's end that decoding ``symbols`` can read: one 32-bit word per symbol
    and the initial state, with room for the escape (bypass) codes of the last real bits. Past the
    end only zero words come in; they keep the state's low bits zero, so each symbol then decodes
    as the table's first entry, which is never an escape, and reads at most one word."""
    return 4 * (symbols + 2) + 4096


def corrupt(message: str) -> ComneckInputError:
    return ComneckInputError(message, ErrorCode.CORRUPT_BITSTREAM)


class CheckingCoder:
    """Stands in for an entropy model's coder (``EntropyModel.entropy_coder``): decodes as it does
    and, inside :func:`checked_streams`, checks each decoded stream by encoding it again."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:  # ``name`` and the rest of CompressAI's coder
        if name == "_inner":  # not set yet (copy and pickle build the object without __init__)
            raise AttributeError(name)
        return getattr(self._inner, name)

    def encode_with_indexes(self, *args: Any, **kwargs: Any) -> bytes:
        return self._inner.encode_with_indexes(*args, **kwargs)

    def decode_with_indexes(self, string: bytes, indexes: list[int], cdfs: list[list[int]], lengths: list[int],
                            offsets: list[int]) -> list[int]:
        values = self._inner.decode_with_indexes(string, indexes, cdfs, lengths, offsets)
        originals: dict[int, bytes] | None = getattr(_active, "originals", None)
        if originals is not None:
            original = originals.pop(id(string), None)
            if original is None:
                raise RuntimeError("a stream was decoded that checked_streams did not pad")
            if values and max(map(abs, values)) > MAX_SYMBOL:
                raise corrupt("the entropy-coded streams decode to impossible latent values (forged escape codes)")
            if self._inner.encode_with_indexes(values, indexes, cdfs, lengths, offsets) != original:
                raise corrupt("the entropy-coded streams do not hold the symbols the latent grid needs (cut, altered or swapped)")
        return values


def install(model: nn.Module) -> None:
    """Put a :class:`CheckingCoder` in front of every entropy model's coder in ``model`` (once)."""
    for module in model.modules():
        coder = getattr(module, "entropy_coder", None)
        if coder is not None and not isinstance(coder, CheckingCoder):
            module.entropy_coder = CheckingCoder(coder)


@contextmanager
def checked_streams(strings: list[list[bytes]], symbols: list[int]) -> Iterator[list[list[bytes]]]:
    """``strings`` ([stream][item]) padded for decoding; every stream decoded inside the block is
    checked by the :class:`CheckingCoder` s, and each must be decoded exactly once."""
    for stream in strings:
        if any(len(s) < RANS_STATE_BYTES for s in stream):
            raise corrupt(f"an entropy-coded stream of {min(map(len, stream))} bytes is shorter than the coder's "
                          f"{RANS_STATE_BYTES}-byte state")
    padded = [[s + bytes(reads_bound(count)) for s in stream] for stream, count in zip(strings, symbols)]
    _active.originals = {id(p): s for stream, padded_stream in zip(strings, padded) for s, p in zip(stream, padded_stream)}
    try:
        yield padded
        if _active.originals:
            raise RuntimeError(f"{len(_active.originals)} streams were not decoded")
    finally:
        _active.originals = None
