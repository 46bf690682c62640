"""comneck.rans_encoder against CompressAI 1.2.8's C++ ``RansEncoder``, byte for byte.

CompressAI's encoder sizes its output buffer by its number of coding steps, and the final flush
alone writes two words: with no symbol it crashes (null pointer), with one plain symbol it writes
before its buffer (glibc aborts on the heap damage). Those cases are checked here by arithmetic and
by CompressAI's decoder instead; every comparison with its encoder has at least two steps.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from compressai.ans import RansDecoder, RansEncoder
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from compressai.models.base import get_scale_table

from comneck.rans_encoder import ESCAPE_REACH, encode_with_indexes

ROOT = Path(__file__).resolve().parents[1]
#: How far outside its table CompressAI's encoder can code a symbol: a raw value of at most 7
#: nibbles (28 bits) holds 2 * distance, less one below the table (hard-coded, not taken from the module).
REACH = 2**27


def tables_of(model) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An updated CompressAI entropy model's (cdfs, cdf_lengths, offsets), as the edge holds them."""
    return model._quantized_cdf.numpy(), model._cdf_length.numpy(), model._offset.numpy()


@pytest.fixture(scope="module")
def gaussian() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    model = GaussianConditional(get_scale_table().tolist())
    model.update()
    return tables_of(model)


@pytest.fixture(scope="module")
def bottleneck() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    torch.manual_seed(0)
    model = EntropyBottleneck(24)
    with torch.no_grad():
        for param in [*model.matrices, *model.biases, *model.factors]:
            param.add_(torch.randn_like(param) * 0.5)
        low, high = -torch.rand(24) * 30 - 1, torch.rand(24) * 30 + 1
        model.quantiles.copy_(torch.stack([low, (torch.rand(24) - 0.5) * 4, high], dim=1)[:, None, :])
    model.update(force=True)
    cdfs, lengths, offsets = tables_of(model)
    assert len(set(lengths.tolist())) > 5  # tables of many lengths, padded
    return cdfs, lengths, offsets


def compressai_bytes(symbols, indexes, cdfs, lengths, offsets) -> bytes:
    """CompressAI's encoder on the same input (lists, as its entropy models pass them)."""
    args = [np.asarray(a).tolist() for a in (symbols, indexes, cdfs, lengths, offsets)]
    return RansEncoder().encode_with_indexes(*args)


def compressai_decoded(stream: bytes, indexes, cdfs, lengths, offsets) -> list[int]:
    args = [np.asarray(a).tolist() for a in (indexes, cdfs, lengths, offsets)]
    return RansDecoder().decode_with_indexes(stream, *args)


def mixed_symbols(rng: np.random.Generator, indexes: np.ndarray, lengths: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Mostly in-range symbols, concentrated near the middle of each table as real latents are, and
    one in ten escaped: just outside, far outside (up to the farthest CompressAI can code, 7
    nibbles of bypass), on both sides, plus the escape edges max_value and -1."""
    low, max_value = offsets[indexes], lengths[indexes] - 2
    n = len(indexes)
    symbols = low + np.clip(np.round(max_value / 2 + rng.normal(0, 1, n) * max_value / 6), 0, max_value - 1).astype(np.int64)
    out = rng.random(n) < 0.1
    kind = rng.integers(0, 6, n)
    reach = rng.integers(1, REACH + 1, n)
    near = rng.integers(1, 40, n)
    escaped = np.select(
        [kind == 0, kind == 1, kind == 2, kind == 3, kind == 4],
        [low - near, low + max_value - 1 + near, low - reach, low + max_value - 1 + reach, low + max_value],
        low - 1,
    )
    symbols[out] = escaped[out]
    symbols[:2] = low[0] - REACH, low[1] + max_value[1] - 1 + REACH  # the farthest codable
    return symbols.astype(np.int32)


@pytest.mark.parametrize(("tables", "seed", "per_channel"), [("gaussian", 0, False), ("gaussian", 1, False), ("gaussian", 2, False),
                                                              ("bottleneck", 4, True)])
def test_compressais_tables_give_compressais_bytes(request, tables, seed, per_channel):
    """Gaussian-conditional tables with random indexes; the entropy bottleneck's channel by channel, as compress() orders them."""
    cdfs, lengths, offsets = request.getfixturevalue(tables)
    rng = np.random.default_rng(seed)
    indexes = (np.repeat(np.arange(len(lengths), dtype=np.int32), 500) if per_channel
               else rng.integers(0, len(lengths), 20_000).astype(np.int32))
    symbols = mixed_symbols(rng, indexes, lengths, offsets)
    ours = encode_with_indexes(symbols, indexes, cdfs, lengths, offsets)
    assert ours == compressai_bytes(symbols, indexes, cdfs, lengths, offsets)
    assert compressai_decoded(ours, indexes, cdfs, lengths, offsets) == symbols.tolist()


def test_lists_give_the_same_bytes_as_arrays(gaussian):
    cdfs, lengths, offsets = gaussian
    rng = np.random.default_rng(3)
    indexes = rng.integers(0, len(lengths), 500).astype(np.int32)
    symbols = mixed_symbols(rng, indexes, lengths, offsets)
    as_lists = [a.tolist() for a in (symbols, indexes, cdfs, lengths, offsets)]
    # rows cut to their own lengths: CompressAI's padding is not needed
    as_lists[2] = [row[:size] for row, size in zip(as_lists[2], as_lists[3])]
    assert encode_with_indexes(*as_lists) == encode_with_indexes(symbols, indexes, cdfs, lengths, offsets)


def test_no_escape_at_all(bottleneck):
    cdfs, lengths, offsets = bottleneck
    rng = np.random.default_rng(5)
    indexes = rng.integers(0, len(lengths), 3000).astype(np.int32)
    symbols = offsets[indexes] + rng.integers(0, lengths[indexes] - 2)
    ours = encode_with_indexes(symbols, indexes, cdfs, lengths, offsets)
    assert ours == compressai_bytes(symbols, indexes, cdfs, lengths, offsets)


def test_empty_input_is_the_flushed_initial_state(gaussian):
    cdfs, lengths, offsets = gaussian
    stream = encode_with_indexes([], [], cdfs, lengths, offsets)
    assert stream == struct.pack("<II", 2**31, 0)
    assert compressai_decoded(stream, [], cdfs, lengths, offsets) == []


def test_single_symbol_in_range(gaussian):
    cdfs, lengths, offsets = gaussian
    table, value = 7, 3
    start, freq = int(cdfs[table, value]), int(cdfs[table, value + 1] - cdfs[table, value])
    x = (2**31 // freq << 16) + 2**31 % freq + start  # one rANS step from the initial state, no output word
    stream = encode_with_indexes([offsets[table] + value], [table], cdfs, lengths, offsets)
    assert stream == struct.pack("<II", x & 0xFFFFFFFF, x >> 32)
    assert compressai_decoded(stream, [table], cdfs, lengths, offsets) == [offsets[table] + value]


@pytest.mark.parametrize("where", ["max_value", "minus_one", "far_below", "far_above"])
def test_single_escaped_symbol(gaussian, where):
    cdfs, lengths, offsets = gaussian
    table = 40
    low, max_value = int(offsets[table]), int(lengths[table]) - 2
    symbol = {"max_value": low + max_value, "minus_one": low - 1, "far_below": low - REACH,
              "far_above": low + max_value - 1 + REACH}[where]
    stream = encode_with_indexes([symbol], [table], cdfs, lengths, offsets)
    assert stream == compressai_bytes([symbol], [table], cdfs, lengths, offsets)
    assert compressai_decoded(stream, [table], cdfs, lengths, offsets) == [symbol]


def test_every_table_at_its_edges(gaussian):
    cdfs, lengths, offsets = gaussian
    tables = np.arange(len(lengths))
    edges = [np.zeros_like(tables), lengths - 3, lengths - 2, np.full_like(tables, -1)]  # first, last, max_value, -1
    indexes = np.tile(tables, len(edges)).astype(np.int32)
    symbols = (np.tile(offsets, len(edges)) + np.concatenate(edges)).astype(np.int32)
    ours = encode_with_indexes(symbols, indexes, cdfs, lengths, offsets)
    assert ours == compressai_bytes(symbols, indexes, cdfs, lengths, offsets)
    assert compressai_decoded(ours, indexes, cdfs, lengths, offsets) == symbols.tolist()


def test_symbol_minus_offset_wraps_around_as_int32_like_the_cpp():
    cdfs, lengths = [[0, 30000, 60000, 65536]] * 2, [4, 4]
    offsets = [-(2**31) + 1, 2**31 - 3]
    # 2**31-1 - (-2**31+1) wraps to -2, -2**31 - (2**31-3) wraps to 3: escapes with small raw values
    symbols, indexes = [2**31 - 1, -(2**31), offsets[0] + 1, offsets[1] + 1, 2**31 - 1], [0, 1, 0, 1, 0]
    ours = encode_with_indexes(symbols, indexes, cdfs, lengths, offsets)
    assert ours == compressai_bytes(symbols, indexes, cdfs, lengths, offsets)


def test_symbols_beyond_reach_are_refused(gaussian):
    """CompressAI's encoder never returns on them (a uint32 shifted by 32 in its nibble count)."""
    assert ESCAPE_REACH == REACH
    cdfs, lengths, offsets = gaussian
    low, max_value = int(offsets[0]), int(lengths[0]) - 2
    for symbol in (low - REACH - 1, low + max_value + REACH, 2**31 - 1, -(2**31)):
        with pytest.raises(ValueError, match="outside the range"):
            encode_with_indexes([1, symbol], [0, 0], cdfs, lengths, offsets)


def test_bad_inputs_are_refused(gaussian):
    cdfs, lengths, offsets = gaussian
    good = dict(symbols=[0, 1], indexes=[0, 63], cdfs=cdfs, cdf_lengths=lengths, offsets=offsets)
    assert encode_with_indexes(**good)

    def refused(error=ValueError, match=None, **change):
        with pytest.raises(error, match=match):
            encode_with_indexes(**{**good, **change})

    refused(symbols=[0], match="1 symbols but 2 indexes")
    refused(indexes=[0, 64], match="indexes must lie")
    refused(indexes=[-1, 0], match="indexes must lie")
    refused(cdf_lengths=lengths[:-1], match="must match")
    refused(offsets=offsets[:-1], match="must match")
    refused(symbols=[0, 2**31], match="int32")
    refused(symbols=[0.0, 1.0], error=TypeError)
    refused(symbols=[[0, 1]], indexes=[[0, 63]], match="1-D")
    short = lengths.copy()
    short[3] = 2
    refused(cdf_lengths=short, match="at least 3")
    long = lengths.copy()
    long[3] = cdfs.shape[1] + 1
    refused(cdf_lengths=long, match="at most")
    flat = cdfs.copy()
    flat[5, 2] = flat[5, 1]
    refused(cdfs=flat, match="rise strictly")
    scaled = cdfs.copy()
    scaled[5, lengths[5] - 1] = 2**15
    refused(cdfs=scaled, match="end at 65536")
    refused(cdfs=cdfs[:, :, None], match="2-D")


def test_importing_and_encoding_needs_neither_torch_nor_compressai():
    code = (
        "import sys\n"
        "import comneck.rans_encoder as r\n"
        "print(r.__file__)\n"
        "print(r.encode_with_indexes([0, 1, 9], [0, 0, 0], [[0, 1000, 65536]], [3], [0]).hex())\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'compressai')))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "shared")}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    path, stream, heavy = run.stdout.splitlines()
    assert Path(path) == ROOT / "shared" / "comneck" / "rans_encoder.py"
    assert bytes.fromhex(stream) == compressai_bytes([0, 1, 9], [0, 0, 0], [[0, 1000, 65536]], [3], [0])
    assert heavy == "[]"
