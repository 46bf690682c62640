"""Determinism harness: encode under one configuration, decode under another, count what differs.

Configurations vary what may change float results between an edge device and a gateway: torch
CPU threads (1/2/4), batch size (1/4, encoding and decoding), oneDNN (mkldnn) on/off, and the
device (CUDA when present, encoding and decoding). Each pair encodes the same N images (the
bundled photos, cropped and flipped) and decodes them, once per way of evaluating the entropy
parameters (``fixed``: comneck.fixed_point, the default; ``float``: CompressAI's), counting per image:

* symbol mismatches: decoded y_hat elements that differ from the encoder's by a whole step
  (another symbol, so the rest of the stream would be garbage),
* y_hat mismatches: elements that differ at all (float noise in the recomputed means),
* refusals: streams the checked decoder refuses (corrupt_bitstream), which is what a symbol
  mismatch becomes with comneck.safe_decoding: a loud error instead of wrong latents.

Not a timed test: a report, printed. Results and the command are in docs/bitstream.md.

    .venv/bin/python benchmarks/bench_determinism.py [--preset tiny] [--images 8] [--entropy-params both]
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import dataclass

import torch

from comneck.codec import LearnedCodec, EncodedLatents
from comneck.errors import ComneckInputError
from comneck.image import load_image, resize_for_codec, sample_photo, to_tensor
from comneck.models import RANDOM_WEIGHTS_NOTE, build_codec
from comneck.presets import PRESETS, Preset


@dataclass(frozen=True)
class Config:
    threads: int
    batch: int
    onednn: bool
    device: str = "cpu"

    def __str__(self) -> str:
        return f"{self.device} t{self.threads} b{self.batch} {'dnn' if self.onednn else 'no-dnn'}"

    def apply(self) -> None:
        torch.set_num_threads(self.threads)
        torch.backends.mkldnn.enabled = self.onednn


def images(preset: Preset, count: int) -> torch.Tensor:
    """``count`` codec inputs [count, 3, S, S]: the bundled photos, cropped at several offsets and flipped."""
    side = preset.image_size
    photos = [to_tensor(resize_for_codec(load_image(p), "none")) for p in sorted(sample_photo().parent.glob("*.png"))]
    out = []
    for k in itertools.count():
        photo = photos[k % len(photos)]
        h, w = photo.shape[-2:]
        top, left = (k * 37) % max(1, h - side), (k * 53) % max(1, w - side)
        crop = photo[..., top : top + side, left : left + side]
        crop = torch.nn.functional.interpolate(crop, size=(side, side), mode="bilinear", antialias=True) if crop.shape[-1] != side or crop.shape[-2] != side else crop
        out.append(crop.flip(-1) if k % 2 else crop)
        if len(out) == count:
            return torch.cat(out)


def encode(codec: LearnedCodec, x: torch.Tensor, config: Config, fixed_point: bool) -> tuple[list[EncodedLatents], list[torch.Tensor]]:
    config.apply()
    model = codec.to(config.device)
    latents, y_hats = [], []
    for start in range(0, x.shape[0], config.batch):
        batch, y = model.analyze(x[start : start + config.batch].to(config.device), fixed_point)
        latents += [batch.item(i) for i in range(batch.batch_size)]
        y_hats += list(y.cpu().split(1))
    codec.to("cpu")
    return latents, y_hats


def decode(codec: LearnedCodec, latents: list[EncodedLatents], config: Config) -> list[torch.Tensor | None]:
    """Decoded y_hat per image (None: refused), ``config.batch`` images per decoder call."""
    config.apply()
    model = codec.to(config.device)
    out: list[torch.Tensor | None] = []
    for start in range(0, len(latents), config.batch):
        group = latents[start : start + config.batch]
        strings = [[s for item in group for s in item.strings[k]] for k in range(len(group[0].strings))]
        try:
            out += list(model.entropy_decode(EncodedLatents(strings, group[0].padded_size, group[0].fixed_point)).cpu().split(1))
        except ComneckInputError:
            out += [None] * len(group)
    codec.to("cpu")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--entropy-params", default="both", choices=("fixed", "float", "both"), help="which evaluation(s) to test")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    codec = build_codec(preset)
    x = images(preset, args.images)
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    configs = [Config(t, b, d, dev) for dev in devices for t in (1, 2, 4) for b in (1, 4) for d in (True, False)]
    reference = Config(1, 1, True)
    pairs = [(reference, reference)] + [(reference, c) for c in configs if c != reference] + [(c, reference) for c in configs if c != reference]
    print(f"preset {preset.name}, {args.images} images; {RANDOM_WEIGHTS_NOTE}")
    for mode in ("fixed", "float") if args.entropy_params == "both" else (args.entropy_params,):
        report(codec, x, pairs, mode == "fixed")


def report(codec: LearnedCodec, x: torch.Tensor, pairs: list[tuple[Config, Config]], fixed_point: bool) -> None:
    """Encode once per encoding configuration, decode every pair, print a row per pair and the totals."""
    print(f"\nentropy parameters: {'fixed point' if fixed_point else 'float (CompressAI)'}")
    print(f"{'encode':<20} {'decode':<20} {'symbol mism.':>12} {'y_hat mism.':>12} {'max |dy|':>10} {'refused':>8}")
    encoded = {enc: encode(codec, x, enc, fixed_point) for enc in dict.fromkeys(enc for enc, _ in pairs)}
    totals = [0, 0, 0]
    for enc, dec in pairs:
        latents, y_edge = encoded[enc]
        decoded = decode(codec, latents, dec)
        symbols = floats = refused = 0
        worst = 0.0
        for y_cloud, y_ref in zip(decoded, y_edge):
            if y_cloud is None:
                refused += 1
                continue
            diff = (y_cloud - y_ref).abs()
            symbols += int((diff > 0.25).sum())
            floats += int((diff > 0).sum())
            worst = max(worst, float(diff.max()))
        totals = [totals[0] + symbols, totals[1] + floats, totals[2] + refused]
        print(f"{str(enc):<20} {str(dec):<20} {symbols:>12} {floats:>12} {worst:>10.2e} {refused:>8}")
    print(f"total over {len(pairs)} pairs: {totals[0]} symbol mismatches, {totals[1]} y_hat elements differing, {totals[2]} refusals")


if __name__ == "__main__":
    main()
