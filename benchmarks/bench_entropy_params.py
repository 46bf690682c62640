"""What fixed-point entropy parameters cost against CompressAI's float path: bytes and time.

Encodes N images (the bundled photos, cropped and flipped, as bench_determinism.py makes them)
three ways with the same codec, and decodes each container, one image per call: float and fixed
point as this project codes them (comneck.cut_tables, no re-decoding in compress), and float as
CompressAI ships it (the same bytes; its compress decodes its strings again and its coder calls get
the padded CDF tables). The paths are interleaved: every round times each image with all
three, the order rotating, so a machine that gets slower or faster during the run weighs on all alike.
Prints per image the payload bytes of each path and the difference, then per step (encode at the
edge, entropy decode in the gateway) the median wall time of each path with its spread (10th-90th
percentile over all images and rounds), the ratio of the medians, and the median of the paired
ratios (fixed point / a float path for the same image in the same round) with their spread; then the
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
from bench_edge_encode import compressais

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
    # the float path as CompressAI ships it: its compress decodes its own strings again, and its
    # coder calls get the padded CDF table, which comneck.cut_tables spares both of our paths
    paths = {"float": (codec, False), "fixed point": (codec, True), "CompressAI float": (compressais(codec), False)}
    for model, fixed in paths.values():  # warm up every path (weights converted, buffers allocated)
        model.entropy_decode(model.analyze(x[:1], fixed)[0])
    clocks = {"wall": time.perf_counter, "cpu": time.process_time}
    times: dict[tuple[str, str, str], list[float]] = {(clock, step, path): [] for clock in clocks for step in STEPS for path in paths}
    size: dict[tuple[int, str], int] = {}
    names = list(paths)
    for run in range(args.runs):
        for i in range(args.images):
            item = x[i : i + 1]
            turn = (run + i) % len(names)
            for path in names[turn:] + names[:turn]:  # the order rotates
                model, fixed = paths[path]
                start = {clock: now() for clock, now in clocks.items()}
                latents, _ = model.analyze(item, fixed)
                middle = {clock: now() for clock, now in clocks.items()}
                model.entropy_decode(latents)
                end = {clock: now() for clock, now in clocks.items()}
                for clock in clocks:
                    times[clock, "encode", path].append((middle[clock] - start[clock]) * 1e3)
                    times[clock, "decode", path].append((end[clock] - middle[clock]) * 1e3)
                size[i, path] = latents.num_bytes
    assert all(size[i, "float"] == size[i, "CompressAI float"] for i in range(args.images)), "the float paths wrote different bytes"
    print(f"{'image':>5} {'float B':>8} {'fixed B':>8} {'diff':>7}")
    for i in range(args.images):
        plain, fixed_b = size[i, "float"], size[i, "fixed point"]
        print(f"{i:>5} {plain:>8} {fixed_b:>8} {100 * (fixed_b - plain) / plain:>+6.2f}%")
    total = {path: sum(size[i, path] for i in range(args.images)) for path in ("float", "fixed point")}
    print(f"total {total['float']:>8} {total['fixed point']:>8} {100 * (total['fixed point'] - total['float']) / total['float']:>+6.2f}%")
    print("ms per image, median [10th-90th percentile]; fixed point / each float path: ratio of medians, paired ratio")
    for clock in clocks:
        for step in STEPS:
            fixed = times[clock, step, "fixed point"]
            line = ", ".join(f"{path} {spread(times[clock, step, path])}" for path in names)
            ratios = "; ".join(
                f"/ {path}: {statistics.median(fixed) / statistics.median(times[clock, step, path]):.3f}, paired "
                f"{ratio_spread([a / b for a, b in zip(fixed, times[clock, step, path])])}" for path in ("float", "CompressAI float"))
            print(f"{step} ({clock}): {line}\n    fixed point {ratios}")

if __name__ == "__main__":
    main()
