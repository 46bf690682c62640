"""What fixed-point entropy parameters cost against CompressAI's float path: bytes and time.

Encodes N images (the bundled photos, cropped and flipped, as bench_determinism.py makes them)
both ways with the same codec, and decodes each container, one image per call. Prints per image
the payload bytes of each path and the difference, then the totals and the median encode and
decode times of each path (run in turn, so both see the same machine state).

    .venv/bin/python benchmarks/bench_entropy_params.py [--preset tiny] [--images 16] [--runs 3] [--codec-weights FILE]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_determinism import images

from comneck.models import RANDOM_WEIGHTS_NOTE, build_codec
from comneck.presets import PRESETS


def timed(fn, runs: int) -> tuple[object, float]:
    """``fn()``'s result and its median wall time in ms over ``runs`` calls."""
    times, result = [], None
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - start) * 1e3)
    return result, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per image and path (median)")
    parser.add_argument("--codec-weights", help="ELIC weights (any form build_codec reads); default: seeded random")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    codec = build_codec(preset, args.codec_weights)
    x = images(preset, args.images)
    weights = f"weights {args.codec_weights}" if args.codec_weights else RANDOM_WEIGHTS_NOTE
    print(f"preset {preset.name}, {args.images} images, {torch.get_num_threads()} threads; {weights}")
    print(f"{'image':>5} {'float B':>8} {'fixed B':>8} {'diff':>7}")
    size = {True: 0, False: 0}
    times: dict[tuple[str, bool], list[float]] = {(step, fixed): [] for step in ("encode", "decode") for fixed in (False, True)}
    for i in range(args.images):
        item = x[i : i + 1]
        row = {}
        for fixed in (False, True):
            (latents, _), encode_ms = timed(lambda: codec.analyze(item, fixed), args.runs)
            _, decode_ms = timed(lambda: codec.entropy_decode(latents), args.runs)
            row[fixed] = latents.num_bytes
            size[fixed] += latents.num_bytes
            times["encode", fixed].append(encode_ms)
            times["decode", fixed].append(decode_ms)
        print(f"{i:>5} {row[False]:>8} {row[True]:>8} {100 * (row[True] - row[False]) / row[False]:>+6.2f}%")
    print(f"total {size[False]:>8} {size[True]:>8} {100 * (size[True] - size[False]) / size[False]:>+6.2f}%")
    for step in ("encode", "decode"):
        plain, fixed = statistics.median(times[step, False]), statistics.median(times[step, True])
        print(f"{step} ms per image (median): float {plain:.1f}, fixed point {fixed:.1f} ({100 * (fixed - plain) / plain:+.0f}%)")


if __name__ == "__main__":
    main()
