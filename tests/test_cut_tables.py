"""Gaussian-conditional coding from CDF rows cut to their lengths (comneck.cut_tables) writes
CompressAI's bytes and decodes its symbols, escapes included; every codec codes this way."""

import torch
from compressai.entropy_models import GaussianConditional

from comneck.cut_tables import cdf_rows, install
from comneck.models import build_codec


def test_cut_rows_code_and_decode_as_compressais_padded_table():
    g = torch.Generator().manual_seed(3)
    model = GaussianConditional(None)
    model.update_scale_table(torch.exp(torch.linspace(torch.log(torch.tensor(0.11)), torch.log(torch.tensor(256.0)), 64)))
    install(model)
    rows = cdf_rows(model)
    assert [len(r) for r in rows] == model._cdf_length.tolist() and sum(map(len, rows)) < model._quantized_cdf.numel() / 4
    shape = (2, 8, 6, 5)
    scales = torch.rand(shape, generator=g) * 40 + 0.05
    means = torch.randn(shape, generator=g) * 10
    x = means + torch.randn(shape, generator=g) * scales
    x[0, 0, 0, :3] = torch.tensor([3000.0, -4000.0, 700.5])  # far outside their tables: escapes (bypass coding)
    indexes = model.build_indexes(scales)
    ours = model.compress(x, indexes, means)
    assert ours == GaussianConditional.compress(model, x, indexes, means)  # CompressAI's own method, padded table
    decoded = model.decompress(ours, indexes, means=means)
    assert torch.equal(decoded, GaussianConditional.decompress(model, ours, indexes, means=means))
    assert torch.equal(decoded, model.quantize(x, "dequantize", means))


def test_every_codec_codes_from_cut_rows(tiny):
    codec = build_codec(tiny)
    models = [m for m in codec.model.modules() if isinstance(m, GaussianConditional)]
    assert models and all(m.compress.__func__.__module__ == "comneck.cut_tables" for m in models)
    assert all(m.decompress.__func__.__module__ == "comneck.cut_tables" for m in models)
