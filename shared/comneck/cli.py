"""``comneck``: the researcher's command line (complexity report; more sub-commands follow)."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import run_command
from .presets import PRESETS, get_preset


def _complexity(args: argparse.Namespace) -> str:
    from .complexity import complexity_report, format_report, report_json

    preset = get_preset(args.preset)
    split = preset.split_block if args.split is None else args.split
    report = complexity_report(preset, size=args.size, split_block=split)
    return json.dumps(report_json(report), indent=2) if args.json else format_report(report, args.size, split)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="comneck",
        description="ComNeck: compressed image latents -> transform-neck -> CLIP tail -> multimodal LLM.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    cx = sub.add_parser(
        "complexity",
        help="parameters and kMAC/pixel of every network, beside the paper's Table 3",
        description="Count parameters and multiply-accumulates per pixel of the neck, the ELIC parts, "
        "the U-Net baseline and the CLIP head/tail (random weights: counts need no checkpoint).",
    )
    cx.add_argument("--json", action="store_true", help='print {component: {"params", "kmac_per_pixel"}}')
    cx.add_argument("--size", type=int, default=256, help="square codec input side in pixels (multiple of 64)")
    cx.add_argument("--preset", default="paper", choices=sorted(PRESETS), help="model sizes (default: paper)")
    cx.add_argument("--split", type=int, default=None, help="CLIP blocks replaced by the neck (default: preset's, 2)")
    cx.set_defaults(func=_complexity)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("comneck", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
