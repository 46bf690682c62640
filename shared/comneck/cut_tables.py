"""CompressAI's Gaussian-conditional coding with each CDF row cut to its length.

``GaussianConditional.compress`` and ``decompress`` (CompressAI 1.2.8) hand the rANS coder the
whole padded CDF table as Python lists on every call: 64 rows by the longest row's 3133 entries for
the default scale table. The table's ``tolist`` and pybind11's conversion of it cost about 6 ms a
call, and ELIC makes ten calls an image (five channel groups, two checkerboard passes), so they
cost more than the coding itself, on the edge and again in the gateway. The coder reads no entry
of a row past the row's length (``cdf_lengths``: ``rans_interface.cpp`` looks up ``cdf[value]``
with ``value <= cdf_length - 2`` when encoding and searches ``[0, cdf_length)`` when decoding), so
the rows cut to their lengths, about an eighth of the table, give the same bytes and the same
symbols; ``tests/test_cut_tables.py`` checks both against CompressAI's own methods, escapes
included. Written here because CompressAI's methods take no table but their own.
"""

from __future__ import annotations

from types import MethodType

import torch
from compressai.entropy_models import GaussianConditional
from torch import nn


def cdf_rows(model: GaussianConditional) -> list[list[int]]:
    """The model's quantised CDF rows, each cut to its length: all the coder reads."""
    table = model._quantized_cdf.numpy()
    return [table[i, :n].tolist() for i, n in enumerate(model._cdf_length.tolist())]


def _tables(model: GaussianConditional, indexes: torch.Tensor) -> tuple[list[list[int]], list[int], list[int]]:
    if indexes.dim() < 2:
        raise ValueError("indexes need at least 2 dimensions (batch first)")
    if model._quantized_cdf.numel() == 0:
        raise ValueError("uninitialised CDF tables: run update() first")
    return cdf_rows(model), model._cdf_length.tolist(), model._offset.tolist()


def _compress(self: GaussianConditional, inputs: torch.Tensor, indexes: torch.Tensor,
              means: torch.Tensor | None = None) -> list[bytes]:
    """``EntropyModel.compress``: one string per batch item, from the cut rows."""
    if inputs.size() != indexes.size():
        raise ValueError("inputs and indexes must have the same size")
    rows, lengths, offsets = _tables(self, indexes)
    symbols = self.quantize(inputs, "symbols", means)
    return [self.entropy_coder.encode_with_indexes(s.reshape(-1).int().tolist(), i.reshape(-1).int().tolist(), rows, lengths, offsets)
            for s, i in zip(symbols, indexes)]


def _decompress(self: GaussianConditional, strings: list[bytes], indexes: torch.Tensor, dtype: torch.dtype = torch.float,
                means: torch.Tensor | None = None) -> torch.Tensor:
    """``EntropyModel.decompress``: the dequantised values of each string, from the cut rows."""
    if not isinstance(strings, (list, tuple)) or len(strings) != indexes.size(0):
        raise ValueError("give one string per batch item of indexes")
    rows, lengths, offsets = _tables(self, indexes)
    outputs = self._quantized_cdf.new_empty(indexes.size())
    for i, string in enumerate(strings):
        values = self.entropy_coder.decode_with_indexes(string, indexes[i].reshape(-1).int().tolist(), rows, lengths, offsets)
        outputs[i] = torch.tensor(values, dtype=outputs.dtype).reshape(outputs[i].size())
    return self.dequantize(outputs, means, dtype)


def install(model: nn.Module) -> None:
    """Code every Gaussian conditional of ``model`` from its cut rows."""
    for module in model.modules():
        if isinstance(module, GaussianConditional):
            module.compress = MethodType(_compress, module)
            module.decompress = MethodType(_decompress, module)
