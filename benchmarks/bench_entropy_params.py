"""What fixed-point entropy parameters cost against CompressAI's float path: bytes and time.

Encodes N images (the bundled photos, cropped and flipped, as bench_determinism.py makes them)
both ways with the same codec, and decodes each container, one image per call. The two paths are
interleaved: every round times each image with both, the order alternating (float first, then
fixed point first), so a machine that gets slower or faster during the run weighs on both alike.
Prints per image the payload bytes of each path and the difference, then per step (encode at the
edge, entropy decode in the gateway) the median wall time of each path with its spread (10th-90th
percentile over all images and rounds), the ratio of the medians, and the median of the paired
ratios (fixed point / float for the same image in the same round) with their spread; then the
same for the process's CPU time (all threads), which a machine shared with other work disturbs
less than the wall time.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_entropy_params.py [--preset tiny] [--images 16] [--runs 5]
        [--threads N] [--codec-weights FILE]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_determinism import images

from comneck.models import RANDOM_WEIGHTS_NOTE, build_codec
from comneck.presets import PRESETS

STEPS = ("encode", "decode")


def spread(values: list[float]) -> str:
    """``median [p10-p90]`` of ``values``."""
    deciles = statistics.quantiles(values, n=10, method="inclusive") if len(values) > 1 else values * 9
    return f"{statistics.median(values):.1f} [{deciles[0]:.1f}-{deciles[-1]:.1f}]"


def ratio_spread(values: list[float]) -> str:
    deciles = statistics.quantiles(values, n=10, method="inclusive") if len(values) > 1 else values * 9
    return f"{statistics.median(values):.3f} [{deciles[0]:.3f}-{deciles[-1]:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--runs", type=int, default=5, help="rounds over the images; each times both paths once per image")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, one per core)")
    parser.add_argument("--codec-weights", help="ELIC weights (any form build_codec reads); default: seeded random")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    codec = build_codec(preset, args.codec_weights)
    x = images(preset, args.images)
    weights = f"weights {args.codec_weights}" if args.codec_weights else RANDOM_WEIGHTS_NOTE
    print(f"preset {preset.name}, {args.images} images, {args.runs} rounds, {torch.get_num_threads()} threads; {weights}")
    for fixed in (False, True):  # warm up both paths (weights converted, buffers allocated)
        codec.entropy_decode(codec.analyze(x[:1], fixed)[0])
    clocks = {"wall": time.perf_counter, "cpu": time.process_time}
    times: dict[tuple[str, str, bool], list[float]] = {(clock, step, fixed): [] for clock in clocks for step in STEPS for fixed in (False, True)}
    paired: dict[tuple[str, str], list[float]] = {(clock, step): [] for clock in clocks for step in STEPS}
    size: dict[tuple[int, bool], int] = {}
    for run in range(args.runs):
        for i in range(args.images):
            item, sample = x[i : i + 1], {}
            for fixed in (False, True) if (run + i) % 2 == 0 else (True, False):
                start = {clock: now() for clock, now in clocks.items()}
                latents, _ = codec.analyze(item, fixed)
                middle = {clock: now() for clock, now in clocks.items()}
                codec.entropy_decode(latents)
                end = {clock: now() for clock, now in clocks.items()}
                for clock in clocks:
                    sample[clock, "encode", fixed] = (middle[clock] - start[clock]) * 1e3
                    sample[clock, "decode", fixed] = (end[clock] - middle[clock]) * 1e3
                size[i, fixed] = latents.num_bytes
            for key in paired:
                times[(*key, False)].append(sample[(*key, False)])
                times[(*key, True)].append(sample[(*key, True)])
                paired[key].append(sample[(*key, True)] / sample[(*key, False)])
    print(f"{'image':>5} {'float B':>8} {'fixed B':>8} {'diff':>7}")
    for i in range(args.images):
        plain, fixed_b = size[i, False], size[i, True]
        print(f"{i:>5} {plain:>8} {fixed_b:>8} {100 * (fixed_b - plain) / plain:>+6.2f}%")
    total = {fixed: sum(size[i, fixed] for i in range(args.images)) for fixed in (False, True)}
    print(f"total {total[False]:>8} {total[True]:>8} {100 * (total[True] - total[False]) / total[False]:>+6.2f}%")
    print("ms per image, median [10th-90th percentile]; ratio fixed point / float")
    for clock, step in paired:
        plain, fixed = statistics.median(times[clock, step, False]), statistics.median(times[clock, step, True])
        print(f"{step} ({clock}): float {spread(times[clock, step, False])}, fixed point {spread(times[clock, step, True])}; "
              f"ratio of medians {fixed / plain:.3f}, paired ratio {ratio_spread(paired[clock, step])}")


if __name__ == "__main__":
    main()
