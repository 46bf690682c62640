"""Symbols per second of the numpy rANS encoder (comneck.rans_encoder, what a torch-free edge
device runs) against CompressAI's C++ ``RansEncoder`` on the same symbols, whose bytes must match.

The symbols are a Gaussian-conditional latent as a hyperprior codec sends it: CompressAI's
default scale table, per-symbol scales log-normal around 0.5 (most latents nearly certain, a few
wide), means 0, plus a few far outliers that take the bypass escape. The encoders alternate
call by call; medians over ``--runs`` with their spread (min-max). CompressAI's time is its
C++ call on ready Python lists (its entropy models pay ``.tolist()`` on top; shown apart).

    .venv/bin/python benchmarks/bench_rans.py [--symbols 300000] [--runs 7] [--outliers 0.001]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from compressai.ans import RansEncoder
from compressai.entropy_models import GaussianConditional
from compressai.models.base import get_scale_table

from comneck.rans_encoder import encode_with_indexes


def interleaved_times(fns: dict[str, Callable[[], object]], runs: int) -> dict[str, list[float]]:
    """Seconds of each call per run, the calls in turn (after one warm-up each)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--symbols", type=int, default=300_000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--outliers", type=float, default=0.001, help="share of symbols moved far outside their table")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model = GaussianConditional(get_scale_table().tolist())
    model.update()
    cdfs, lengths, offsets = (t.numpy() for t in (model._quantized_cdf, model._cdf_length, model._offset))
    rng = np.random.default_rng(args.seed)
    scales = np.exp(rng.normal(np.log(0.5), 1.0, args.symbols))
    indexes = model.build_indexes(torch.from_numpy(scales)).numpy().astype(np.int32)
    symbols = np.round(rng.normal(0.0, 1.0, args.symbols) * scales).astype(np.int32)
    far = rng.random(args.symbols) < args.outliers
    symbols[far] = rng.integers(-5000, 5000, int(far.sum()))
    lists = [a.tolist() for a in (symbols, indexes, cdfs, lengths, offsets)]

    ours = encode_with_indexes(symbols, indexes, cdfs, lengths, offsets)
    theirs = RansEncoder().encode_with_indexes(*lists)
    assert ours == theirs, "the numpy encoder's bytes differ from CompressAI's"
    escaped = int(((symbols - offsets[indexes] < 0) | (symbols - offsets[indexes] >= lengths[indexes] - 2)).sum())
    print(f"{args.symbols} symbols, {escaped} escaped, {len(ours)} bytes ({8 * len(ours) / args.symbols:.3f} bits/symbol); "
          f"bytes identical; median (min-max) of {args.runs} interleaved runs")

    times = interleaved_times({
        "comneck.rans_encoder (numpy arrays)": lambda: encode_with_indexes(symbols, indexes, cdfs, lengths, offsets),
        "compressai C++ (ready lists)": lambda: RansEncoder().encode_with_indexes(*lists),
        "compressai C++ (+ .tolist())": lambda: RansEncoder().encode_with_indexes(
            *[a.tolist() for a in (symbols, indexes, cdfs, lengths, offsets)]),
    }, args.runs)
    print(f"{'encoder':<38} {'ms (min-max)':>22} {'Msymbols/s':>11}")
    for name, spent in times.items():
        median = statistics.median(spent)
        ms = f"{1e3 * median:.1f} ({1e3 * min(spent):.1f}-{1e3 * max(spent):.1f})"
        print(f"{name:<38} {ms:>22} {args.symbols / median / 1e6:11.2f}")


if __name__ == "__main__":
    main()
