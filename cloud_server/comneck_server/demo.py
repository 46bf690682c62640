"""``comneck-demo``: the whole data path on one photo, in one process.

photo -> edge analysis + entropy coding -> bitstream -> entropy decode -> neck -> CLIP tail,
printing the real byte count, bpp, tensor shapes and per-step timings.
"""

from __future__ import annotations

import argparse
import sys

from comneck.bitstream import Bitstream
from comneck.errors import run_command
from comneck.image import RESIZE_POLICIES, sample_photo
from comneck.models import RANDOM_WEIGHTS_NOTE, build_cloud_models
from comneck.presets import PRESETS, get_preset
from comneck_edge import EdgeEncoder

from .features import FeaturePipeline


def run_demo(image: str | None, preset_name: str, rate: int, resize: str) -> str:
    """Run the path once and return the printed report."""
    preset = get_preset(preset_name)
    path = image or str(sample_photo())
    encoder = EdgeEncoder(preset, rate=rate, resize=resize)  # type: ignore[arg-type]
    models = build_cloud_models(preset)
    pipeline = FeaturePipeline(models)

    encoder.encode_file(path)  # warm-up: first calls pay one-off allocation costs
    encoded = encoder.encode_file(path)
    received = Bitstream.from_bytes(encoded.data)  # what the gateway does with the bytes it gets
    pipeline(received)
    result = pipeline(received)

    h, w = received.image_size
    ph, pw = received.latents.padded_size
    f = result.features
    timings = {**encoded.timings_ms, **result.timings_ms}
    lines = [
        f"ComNeck demo: preset {preset.name}, rate index {rate}, codec {preset.codec.arch}",
        f"  {RANDOM_WEIGHTS_NOTE}" if models.random_weights else "  trained weights",
        f"photo        {path}",
        f"codec input  {w}x{h} (resize policy {resize}), padded to {pw}x{ph}",
        f"bitstream    {len(encoded.data)} bytes ({received.latents.num_bytes} in {len(received.latents.strings)} "
        f"rANS streams + {received.overhead_bytes} container), {encoded.bpp:.4f} bpp",
        f"y_hat        {list(result.y_hat.shape)}  (entropy-decoded; g_s not run)",
        f"neck tokens  {list(result.tokens.shape)}  -> CLIP block {preset.split_block + 1}",
        f"CLIP tail    embedding {list(f.embedding.shape)}, tokens after ln_post {list(f.post_ln.shape)}, "
        f"projected {list(f.projected.shape)}",
        "timings (ms) " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()),
        f"total        {sum(timings.values()):.1f} ms",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="comneck-demo",
        description="Run photo -> bitstream -> y_hat -> neck -> CLIP tail once and print bpp, shapes and timings. "
        "With no --image it uses a photo bundled with the package.",
    )
    parser.add_argument("--image", help="photo to encode (default: the bundled cow_beach.png)")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model sizes (default: tiny)")
    parser.add_argument("--rate", type=int, default=1, help="rate index 1..4 (lambda 0.004..0.032)")
    parser.add_argument("--resize", default="paper", choices=RESIZE_POLICIES, help="codec input policy")
    args = parser.parse_args(argv)
    return run_command("comneck-demo", lambda: run_demo(args.image, args.preset, args.rate, args.resize))


if __name__ == "__main__":
    sys.exit(main())
