"""``comneck-edge``: encode photos to ComNeck bitstreams on the device, decode them for viewing.

    comneck-edge encode photo.jpg -o photo.cnk [--preset tiny] [--rate 1..4] [--resize paper]
    comneck-edge decode photo.cnk -o recon.png [--preset tiny]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from comneck.bitstream import Bitstream
from comneck.errors import ComneckInputError, run_command
from comneck.image import RESIZE_POLICIES, padding_of, to_image, unpad
from comneck.models import RANDOM_WEIGHTS_NOTE, build_codec
from comneck.presets import PRESETS, get_preset

from .encoder import EdgeEncoder


def _encode(args: argparse.Namespace) -> str:
    encoder = EdgeEncoder(args.preset, rate=args.rate, resize=args.resize)
    encoded = encoder.encode_file(args.image)
    out = Path(args.output) if args.output else Path(args.image).with_suffix(".cnk")
    try:
        out.write_bytes(encoded.data)
    except OSError as exc:
        raise ComneckInputError(f"cannot write {out}: {exc.strerror}") from None
    h, w = encoded.bitstream.image_size
    return (
        f"{out}: {len(encoded.data)} bytes, {encoded.bpp:.4f} bpp ({w}x{h}, preset {args.preset}, rate {args.rate})\n"
        f"{RANDOM_WEIGHTS_NOTE}"
    )


def _decode(args: argparse.Namespace) -> str:
    try:
        data = Path(args.bitstream).read_bytes()
    except OSError as exc:
        raise ComneckInputError(f"cannot read {args.bitstream}: {exc.strerror}") from None
    stream = Bitstream.from_bytes(data)
    codec = build_codec(get_preset(args.preset))
    stream.check_codec(codec.config.arch, codec.fingerprint())
    with torch.inference_mode():
        x_hat = codec.synthesize(codec.entropy_decode(stream.latents))
    image = to_image(unpad(x_hat, padding_of(*stream.image_size)))
    try:
        image.save(args.output)
    except (OSError, ValueError) as exc:
        raise ComneckInputError(f"cannot write {args.output}: {exc}") from None
    return f"{args.output}: {image.width}x{image.height} reconstructed with g_s\n{RANDOM_WEIGHTS_NOTE}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="comneck-edge",
        description="Encode photos into compact ComNeck bitstreams (ELIC analysis + rANS coding) "
        "and decode them back to images for people to look at.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    enc = sub.add_parser("encode", help="photo -> .cnk bitstream (offline)", description="Encode a photo; prints bpp from the real byte count.")
    enc.add_argument("image", help="photo file (JPEG, PNG, ...)")
    enc.add_argument("-o", "--output", help="bitstream file to write (default: the photo's name with .cnk)")
    enc.add_argument("--rate", type=int, default=1, help="rate index 1..4 (lambda 0.004..0.032; default 1)")
    enc.add_argument("--resize", default="paper", choices=RESIZE_POLICIES, help="codec input policy (default: paper)")
    dec = sub.add_parser("decode", help=".cnk bitstream -> image with g_s", description="Reconstruct the image a bitstream holds.")
    dec.add_argument("bitstream", help=".cnk file written by `comneck-edge encode`")
    dec.add_argument("-o", "--output", required=True, help="image file to write (format from the suffix, e.g. recon.png)")
    for p in (enc, dec):
        p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model sizes (default: tiny)")
    enc.set_defaults(func=_encode)
    dec.set_defaults(func=_decode)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("comneck-edge", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
