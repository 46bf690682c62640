"""What checked entropy decoding costs: ``LearnedCodec.entropy_decode`` (zero-padded streams, every
stream encoded again and compared, comneck.safe_decoding) against CompressAI's plain
``latent_codec.decompress`` on the same strings, in one run. The container is unchanged, so the
checks cost no bytes.

    .venv/bin/python benchmarks/bench_decoding.py [--preset tiny] [--runs 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from comneck.image import sample_photo
from comneck.models import RANDOM_WEIGHTS_NOTE
from comneck.presets import PRESETS
from comneck_edge import EdgeEncoder


def interleaved_medians(fns: list[Callable[[], object]], runs: int) -> list[float]:
    """Median ms of each function, run in turn (after a warm-up) so that other load on the machine
    falls on all of them alike."""
    times: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(runs):
        for fn, spent in zip(fns, times):
            start = time.perf_counter()
            fn()
            spent.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(spent) for spent in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (CI machines have 2 cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    encoder = EdgeEncoder(preset)
    codec = encoder.codec
    print(f"preset {preset.name}, {args.threads} threads, median of {args.runs} runs; {RANDOM_WEIGHTS_NOTE}")
    print(f"{'photo':<22} {'bytes':>6} {'plain ms':>9} {'checked ms':>11} {'overhead':>9}")
    for photo in sorted(sample_photo().parent.glob("*.png")):
        latents = encoder.encode_file(photo).bitstream.latents
        shape = codec.latent_shape(latents.padded_size)
        with torch.inference_mode():
            plain, checked = interleaved_medians(
                [lambda: codec.model.latent_codec.decompress(latents.strings, shape), lambda: codec.entropy_decode(latents)], args.runs
            )
        print(f"{photo.name:<22} {latents.num_bytes:>6} {plain:>9.2f} {checked:>11.2f} {checked / plain - 1:>8.0%}")


if __name__ == "__main__":
    main()
