"""Per-step latency of the ComNeck path against the reconstruction baseline, in one run.

ComNeck (cloud, through ``comneck.pipeline``): entropy decode -> neck -> CLIP tail (blocks k+1..).
Baseline "reconstruction": entropy decode -> g_s -> resize to CLIP's input -> full CLIP.
Both start from the same bitstream of the same photo. Median of --runs after a warm-up;
``--batch`` also times one batched neck + tail pass over that many copies.

    .venv/bin/python benchmarks/bench_pipeline.py [--preset tiny] [--runs 20] [--threads 2] [--batch 8]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from comneck.image import sample_photo
from comneck.models import RANDOM_WEIGHTS_NOTE
from comneck.pipeline import Pipeline
from comneck.presets import PRESETS
from comneck_edge import EdgeEncoder



def median_ms(fn: Callable[[], object], runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def median_split_ms(fn: Callable[[dict[str, float]], object], runs: int) -> dict[str, float]:
    """Medians of the step timings ``fn`` records into the dict it is given."""
    fn({})
    laps: list[dict[str, float]] = []
    for _ in range(runs):
        laps.append({})
        fn(laps[-1])
    return {key: statistics.median(lap[key] for lap in laps) for key in laps[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (CI machines have 2 cores)")
    parser.add_argument("--batch", type=int, default=8, help="items in the batched neck + tail pass")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    preset = PRESETS[args.preset]
    encoder = EdgeEncoder(preset)
    pipeline = Pipeline.from_pretrained(preset=preset, backends=())
    codec = pipeline.models.codec
    photo = sample_photo()
    encoded = encoder.encode_file(photo)
    stream = pipeline.parse(encoded.data)
    (y_hat,) = pipeline.decode([stream])

    with torch.inference_mode():
        x_hat = codec.synthesize(y_hat)
        ours_split = median_split_ms(lambda timings: pipeline.features([y_hat], timings=timings), args.runs)
        batch_split = median_split_ms(lambda timings: pipeline.features([y_hat] * args.batch, timings=timings), args.runs)
        steps = {
            "edge: analysis + entropy coding": median_ms(lambda: encoder.encode_file(photo), args.runs),
            "entropy decode": median_ms(lambda: pipeline.decode([stream]), args.runs),
            "neck": ours_split["neck"],
            "CLIP tail": ours_split["clip_tail"],
            "g_s (baseline)": median_ms(lambda: codec.synthesize(y_hat), args.runs),
            "full CLIP on x_hat (baseline)": median_ms(lambda: pipeline.pixel_features([x_hat]), args.runs),
        }
    ours = steps["entropy decode"] + steps["neck"] + steps["CLIP tail"]
    base = steps["entropy decode"] + steps["g_s (baseline)"] + steps["full CLIP on x_hat (baseline)"]
    batched = (batch_split["neck"] + batch_split["clip_tail"]) / args.batch

    edge = steps["edge: analysis + entropy coding"]
    print(f"preset {preset.name}, {args.threads} threads, median of {args.runs} runs; {RANDOM_WEIGHTS_NOTE}")
    print(f"photo {photo.name}: {len(encoded.data)} bytes, {encoded.bpp:.4f} bpp")
    rows = [(f"  {name}", ms) for name, ms in steps.items()] + [
        ("cloud, ComNeck: decode + neck + tail", ours),
        ("cloud, baseline: decode + g_s + full CLIP", base),
        (f"edge + cloud, {preset.name} preset, ComNeck", edge + ours),
        (f"neck + tail per item, batch of {args.batch}", batched),
        ("neck + tail, batch of 1", steps["neck"] + steps["CLIP tail"]),
    ]
    for label, ms in rows:
        print(f"{label:<46} {ms:9.2f} ms")
    print(f"baseline / ComNeck cloud time: {base / ours:.2f}x")


if __name__ == "__main__":
    main()
