"""A numpy-only rANS encoder whose output is byte for byte CompressAI's ``RansEncoder`` stream.

The edge device carries neither PyTorch nor CompressAI, yet the cloud decodes with CompressAI's
C++ ``RansDecoder``. No maintained Python package writes this exact stream (CompressAI's coder is
a pybind11 extension shipped inside the torch-dependent compressai wheel; other rANS packages, such
as the compiled constriction, follow their own stream conventions and lack CompressAI's escape
code), so this module writes it by hand, with numpy only. It follows the behaviour of
``compressai/cpp_exts/rans/rans_interface.cpp`` and the ryg_rans ``rans64.h`` of CompressAI 1.2.8;
``tests/test_rans_encoder.py`` compares the bytes with the real encoder.

The format, as this module writes it:

* Each symbol ``s`` is coded with the table ``t = indexes[i]``: the quantised CDF row
  ``cdfs[t][:cdf_lengths[t]]`` (16-bit precision: it starts at 0, rises strictly, ends at 2**16)
  and ``value = s - offsets[t]`` (int32 arithmetic, wrapping). The table's last interval,
  ``max_value = cdf_lengths[t] - 2``, is an escape: a value below 0 or at/above ``max_value`` is
  coded as ``max_value`` followed by bypass nibbles.
* Escape: ``raw = -2*value - 1`` for a negative value, else ``2*(value - max_value)`` (as uint32);
  ``n`` = the number of 4-bit nibbles that ``raw`` needs (0 for ``raw == 0``). The escape writes
  ``n`` as one nibble, then the ``n`` nibbles of ``raw``, lowest first.
* Limits: CompressAI's encoder never returns when ``raw`` needs 8 nibbles (its nibble count loop
  shifts a uint32 by 32 bits, which x86 and ARM take modulo 32, so the loop never ends). The
  values it can code are therefore ``-2**27 <= value < max_value + 2**27``; this module raises
  ValueError outside them. With ``n <= 7`` the count is always one nibble: the C++ would write a
  run of 15s then the remainder for ``n >= 15``, which no 32-bit ``raw`` reaches.
* Coding: a 64-bit rANS state starting at ``L = 2**31``, renormalised by emitting its low 32 bits
  whenever the next step would push it to ``2**63`` or beyond. A CDF interval ``(start, freq)``
  maps ``x -> (x // freq) * 2**16 + x % freq + start`` (emit first if ``x >= freq * 2**47``); a
  bypass nibble maps ``x -> 16 * x + nibble`` (emit first if ``x >= 2**59``). The steps run from
  the last one of the last symbol back to the first, so that the decoder reads them forwards.
* Output: the final state as two little-endian 32-bit words (low, high), then every emitted word
  in the reverse order of emission, each little-endian (the C++ writes native ``uint32_t`` words
  backwards into a buffer; every platform CompressAI ships for is little-endian). No symbol at
  all gives just the flushed start state, 8 bytes, which CompressAI's decoder reads (its encoder
  crashes on empty input, and writes before its buffer for a single unescaped symbol).

Speed: everything but the state update is vectorised with numpy (table look-ups, escapes, nibble
expansion); the update itself is inherently sequential and runs as a tight loop over plain Python
ints. ``benchmarks/bench_rans.py`` measures it against the C++ encoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import numpy as np

__all__ = ["PRECISION", "BYPASS_PRECISION", "ESCAPE_REACH", "encode_with_indexes"]

#: Bits of probability resolution of the CDF tables (CompressAI's ``entropy_coder_precision``).
PRECISION = 16
#: Bits per bypass chunk of an escaped value.
BYPASS_PRECISION = 4

_INT32_MIN, _INT32_MAX = -(1 << 31), (1 << 31) - 1
_RANS_L = 1 << 31  # lower bound of the normalised state
_WORD_MASK = (1 << 32) - 1
_NIBBLES = 7  # most bypass nibbles of an escape that CompressAI's encoder can write
#: Escaped values may lie this far outside their table (``raw < 2**28``, see the module docstring).
ESCAPE_REACH = 1 << (BYPASS_PRECISION * _NIBBLES - 1)
# x_max of one step = ((L >> scale_bits) << 32) * freq = freq << (63 - scale_bits)
_CDF_SHIFT = 63 - PRECISION
_BYPASS_XMAX = 1 << (63 - BYPASS_PRECISION)

IntVector = Union[np.ndarray, Sequence[int]]


def _int_vector(values: IntVector, name: str) -> np.ndarray:
    """``values`` as a 1-D int64 array, every entry in int32 range."""
    array = np.asarray(values)
    if array.size == 0:
        if array.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
        return np.zeros(0, dtype=np.int64)
    if array.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {array.dtype}")
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if int(array.min()) < _INT32_MIN or int(array.max()) > _INT32_MAX:
        raise ValueError(f"{name} must fit in int32")
    return array.astype(np.int64, copy=False)


def _cdf_matrix(cdfs: np.ndarray | Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """The CDF rows zero-padded to one int64 matrix, and each row's own length."""
    if isinstance(cdfs, np.ndarray) and cdfs.ndim == 2:
        rows = cdfs
        if rows.size and rows.dtype.kind not in "iu":
            raise TypeError(f"cdfs must hold integers, got dtype {rows.dtype}")
        return rows.astype(np.int64, copy=False), np.full(rows.shape[0], rows.shape[1], dtype=np.int64)
    if isinstance(cdfs, np.ndarray) and cdfs.ndim != 1:
        raise ValueError(f"cdfs must be 2-D, got shape {cdfs.shape}")
    rows = [_int_vector(row, "each cdf") for row in cdfs]
    sizes = np.array([len(row) for row in rows], dtype=np.int64)
    matrix = np.zeros((len(rows), int(sizes.max(initial=0))), dtype=np.int64)
    for i, row in enumerate(rows):
        matrix[i, : len(row)] = row
    return matrix, sizes


def _check_tables(table: np.ndarray, row_sizes: np.ndarray, lengths: np.ndarray) -> None:
    """CompressAI's table invariants, which the C++ only asserts in debug builds: 3 <= length <=
    row size, and each row starts at 0, rises strictly and ends at 2**PRECISION."""
    if np.any(lengths < 3) or np.any(lengths > row_sizes):
        raise ValueError("every cdf_length must be at least 3 and at most the length of its cdf row")
    if table.shape[0] == 0:
        return
    rows = np.arange(table.shape[0])
    if np.any(table[:, 0] != 0) or np.any(table[rows, lengths - 1] != 1 << PRECISION):
        raise ValueError(f"every cdf must start at 0 and end at {1 << PRECISION} (at cdf_length - 1)")
    inside = np.arange(table.shape[1] - 1)[None, :] < (lengths - 1)[:, None]
    if np.any(np.diff(table, axis=1)[inside] <= 0):
        raise ValueError("every cdf must rise strictly up to cdf_length - 1")


def _step_keys(symbols: np.ndarray, indexes: np.ndarray, table: np.ndarray, lengths: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The coding steps in stream order, each as a key: ``t * width + v`` codes CDF interval ``v``
    of table ``t``; ``table.size + nibble`` is a bypass nibble."""
    max_value = lengths[indexes] - 2
    value = symbols - offsets[indexes]
    value = ((value - _INT32_MIN) & _WORD_MASK) + _INT32_MIN  # int32 wrap-around, as in the C++
    negative = value < 0
    escaped = negative | (value >= max_value)
    keys = indexes * table.shape[1] + np.where(escaped, max_value, value)
    if not escaped.any():
        return keys

    which = np.flatnonzero(escaped)
    v, m = value[which], max_value[which]
    raw = np.where(negative[which], -2 * v - 1, 2 * (v - m))
    too_far = raw >= 1 << (BYPASS_PRECISION * _NIBBLES)
    if too_far.any():
        bad = which[np.argmax(too_far)]
        low = offsets[indexes[bad]]
        raise ValueError(
            f"symbol {symbols[bad]} at position {bad} lies more than {ESCAPE_REACH} outside the range "
            f"[{low}, {low + max_value[bad] - 1}] of table {indexes[bad]}: CompressAI's encoder never returns on it")
    shifts = BYPASS_PRECISION * np.arange(_NIBBLES)
    count = (raw[:, None] >= (1 << shifts)[None, :]).sum(axis=1)  # nibbles raw needs
    # per escape: the count nibble, then the raw nibbles (lowest first), padded to 1 + _NIBBLES
    chunks = np.empty((len(which), 1 + _NIBBLES), dtype=np.int64)
    chunks[:, 0] = count
    chunks[:, 1:] = (raw[:, None] >> shifts[None, :]) & ((1 << BYPASS_PRECISION) - 1)
    used = np.arange(1 + _NIBBLES)[None, :] <= count[:, None]

    per_symbol = np.ones(len(symbols), dtype=np.int64)
    per_symbol[which] += 1 + count
    first = np.cumsum(per_symbol) - per_symbol  # each symbol's first step
    out = np.empty(int(first[-1] + per_symbol[-1]), dtype=np.int64)
    out[first] = keys
    positions = first[which][:, None] + 1 + np.arange(1 + _NIBBLES)[None, :]
    out[positions[used]] = table.size + chunks[used]
    return out


def _steps(keys: np.ndarray, table: np.ndarray) -> list[tuple[int, int, int, int]]:
    """The steps last to first as ``(x_max, freq, M - freq, start)`` tuples of plain ints: the
    state ``x`` emits its low word if ``x >= x_max``, then becomes ``x + (x // freq) * (M - freq) +
    start``, which is ``(x // freq) * M + x % freq + start``. A CDF interval has ``M = 2**16``; a
    bypass nibble is ``freq = 1``, ``M = 2**4``, ``start = nibble``. Each distinct step is built
    once; the per-step list shares those tuples (gathered by numpy, so no Python loop)."""
    present = np.zeros(table.size + (1 << BYPASS_PRECISION), dtype=bool)
    present[keys] = True
    distinct = np.flatnonzero(present)
    rank = np.cumsum(present) - 1
    cdf_keys = distinct[distinct < table.size]
    start = table.ravel()[cdf_keys]
    freq = table.ravel()[cdf_keys + 1] - start
    nibbles = (distinct[len(cdf_keys):] - table.size).tolist()
    tuples = np.empty(len(distinct), dtype=object)
    made = zip((freq << _CDF_SHIFT).tolist(), freq.tolist(), ((1 << PRECISION) - freq).tolist(), start.tolist())
    for i, step in enumerate(made):  # one by one: slice assignment would unpack the tuples
        tuples[i] = step
    for i, nibble in enumerate(nibbles, len(cdf_keys)):
        tuples[i] = (_BYPASS_XMAX, 1, (1 << BYPASS_PRECISION) - 1, nibble)
    return tuples[rank[keys[::-1]]].tolist()


def _run(steps: list[tuple[int, int, int, int]]) -> bytes:
    """Codes ``steps`` (last step first) and returns the stream bytes."""
    words: list[int] = []
    emit = words.append
    x = _RANS_L
    for x_max, freq, rest, start in steps:
        if x >= x_max:
            emit(x & 0xFFFFFFFF)
            x >>= 32
        x += x // freq * rest + start
    words.append(x >> 32)
    words.append(x & 0xFFFFFFFF)
    return np.array(words[::-1], dtype="<u4").tobytes()


def encode_with_indexes(
    symbols: IntVector,
    indexes: IntVector,
    cdfs: np.ndarray | Sequence[Sequence[int]],
    cdf_lengths: IntVector,
    offsets: IntVector,
) -> bytes:
    """The bytes ``compressai.ans.RansEncoder().encode_with_indexes`` returns for these arguments.

    ``symbols[i]`` is coded with table ``indexes[i]``: CDF row ``cdfs[t]`` (2-D padded array as in
    CompressAI's ``_quantized_cdf``, or a list of rows), of which the first ``cdf_lengths[t]``
    entries count, and ``offsets[t]`` (the symbol of CDF bin 0). Integers must fit in int32.
    Raises ValueError for mismatched lengths, indexes outside the tables, malformed tables or a
    symbol more than ESCAPE_REACH outside its table (CompressAI's encoder hangs on those), and
    TypeError for non-integer input.
    """
    symbols = _int_vector(symbols, "symbols")
    indexes = _int_vector(indexes, "indexes")
    table, row_sizes = _cdf_matrix(cdfs)
    lengths = _int_vector(cdf_lengths, "cdf_lengths")
    offsets = _int_vector(offsets, "offsets")
    if len(symbols) != len(indexes):
        raise ValueError(f"{len(symbols)} symbols but {len(indexes)} indexes")
    if not len(lengths) == len(offsets) == len(table):
        raise ValueError(f"{len(table)} cdfs, {len(lengths)} cdf_lengths and {len(offsets)} offsets: they must match")
    if len(indexes) and (indexes.min() < 0 or indexes.max() >= len(table)):
        raise ValueError(f"indexes must lie in [0, {len(table)})")
    _check_tables(table, row_sizes, lengths)
    if not len(symbols):
        return _run([])
    return _run(_steps(_step_keys(symbols, indexes, table, lengths, offsets), table))
