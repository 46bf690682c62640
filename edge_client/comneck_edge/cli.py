"""``comneck-edge``: encode photos to ComNeck bitstreams on the device, ask a gateway, decode for viewing.

    comneck-edge encode photo.jpg -o photo.cnk [--preset tiny] [--rate 1..4] [--resize paper]
    comneck-edge encode photo.jpg --onnx edge-folder        (ONNX Runtime, no PyTorch: comneck export-edge)
    comneck-edge encode photo.jpg --server http://gateway:8000 --prompt "Labels: cat, dog"
    comneck-edge encode query.jpg --server URL --task fewshot --support cat.jpg=cat --support dog.jpg=dog
    comneck-edge support-set register pets cat.jpg=cat dog.jpg=dog --server URL   (then --support-set pets)
    comneck-edge decode photo.cnk -o recon.png [--preset tiny]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from comneck.errors import run_command
from comneck.presets import PRESETS, RESIZE_POLICIES
from comneck.version import __version__

from .client import DEFAULT_RETRIES


def _positive(unit: str) -> Callable[[str], float]:
    """An argparse type: a positive number of ``unit``."""
    def parse(text: str) -> float:
        value = float(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be a positive number of {unit}, got {text}")
        return value

    parse.__name__ = f"number of {unit}"  # argparse names the type this way when the text is no number
    return parse


def _positive_count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {text}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _add_gateway_arguments(group: Any) -> None:
    """How to reach a gateway: shared by ``encode --server`` and ``support-set``."""
    group.add_argument("--timeout", type=_positive("seconds"), default=60.0, help="seconds to wait for each HTTP answer (default 60)")
    group.add_argument(
        "--retries", type=_count, default=DEFAULT_RETRIES,
        help=f"retries on 429/503, after Retry-After plus a jittered exponential backoff (default {DEFAULT_RETRIES})",
    )
    group.add_argument("--api-key", help="API key (default: the COMNECK_API_KEY environment variable)")
    group.add_argument("--format", default="msgpack", choices=("msgpack", "multipart"), help="request body encoding (default msgpack)")


def _add_encoding_arguments(parser: argparse.ArgumentParser) -> None:
    """How photos become bitstreams: shared by ``encode`` and ``support-set register``."""
    parser.add_argument("--rate", type=int, default=None, help="rate index 1..4 (lambda 0.004..0.032); default: the codec weights' own, else 1")
    parser.add_argument("--resize", default="paper", choices=RESIZE_POLICIES, help="codec input policy (default: paper)")
    parser.add_argument(
        "--entropy-params", default="fixed", choices=("fixed", "float"),
        help="how the entropy parameters are computed: fixed point, the same on every machine (default), or "
        "CompressAI's float networks, which a decoder on other hardware may read differently (docs/bitstream.md)",
    )
    parser.add_argument(
        "--runtime", default="auto", choices=("auto", "torch", "onnx"),
        help="torch: PyTorch and CompressAI (the edge extra); onnx: ONNX Runtime and numpy, no PyTorch, over the folder --onnx "
        "names (the edge-lite extra; docs/edge.md); auto (default): onnx when --onnx is given or PyTorch is not installed",
    )
    parser.add_argument("--onnx", metavar="FOLDER", action="append",
                        help="the ONNX edge's folder, written by `comneck export-edge WEIGHTS -o FOLDER` (default: the "
                        "COMNECK_EDGE_ONNX environment variable); repeat it for several rate points, with --max-bytes or --target-bpp")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="comneck-edge",
        description="Encode photos into compact ComNeck bitstreams (ELIC analysis + rANS coding) "
        "and decode them back to images for people to look at.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    enc = sub.add_parser(
        "encode",
        help="photo -> .cnk bitstream (offline), or -> answer from a gateway (--server)",
        description="Encode a photo and print bpp from the real byte count. With --server URL --prompt TEXT, "
        "send the bitstream to a ComNeck gateway and print its answer with timings; 429/503 answers are "
        "retried after the server's Retry-After with a jittered backoff.",
    )
    enc.add_argument("image", help="photo file (JPEG, PNG, ...), or a folder of them (each encoded, with a progress bar)")
    enc.add_argument("-o", "--output", help="bitstream file to write (default: the photo's name with .cnk; none with --server); "
                     "for a folder, the folder to write one .cnk per photo into (default: beside the photos; none with --server)")
    enc.add_argument("--jobs", type=_positive_count, default=1, metavar="N",
                     help="a folder: photos encoded (and, with --server, requests in flight) at a time (default: 1)")
    _add_encoding_arguments(enc)
    budget = enc.add_mutually_exclusive_group()
    budget.add_argument("--max-bytes", type=_positive_count, metavar="N",
                        help="rate control: the highest rate point (--onnx or --codec-weights, repeated) whose container fits N bytes; "
                        "a photo whose smallest container is larger is refused with that size")
    budget.add_argument("--target-bpp", type=_positive("bits per pixel"), metavar="BPP",
                        help="rate control by bits per pixel of the image the codec sees (the byte budget is BPP x pixels / 8)")
    ask = enc.add_argument_group("asking a gateway")
    ask.add_argument("--server", metavar="URL", help="gateway base URL, e.g. http://127.0.0.1:8000")
    ask.add_argument("--prompt", help="question or instruction for the model (clip-zero-shot: 'Labels: a, b, c'); "
                     "not needed for --task caption or few-shot support")
    ask.add_argument("--task", help="caption, vqa, rec, classify or fewshot (default: the backend's first task; fewshot with --support)")
    ask.add_argument("--backend", help="backend name (default: the gateway's first; see GET /v1/models)")
    ask.add_argument("--choice", action="append", default=[], metavar="TEXT",
                     help="one option of a multiple-choice question, in order A, B, ... (repeatable, 2 to 26; honeybee)")
    ask.add_argument("--support", action="append", default=[], metavar="PHOTO=LABEL",
                     help="task fewshot: a labelled support photo, encoded like the query (repeatable, 2 classes at least; v2l)")
    ask.add_argument("--support-set", metavar="NAME", help="task fewshot: a support set registered with `comneck-edge support-set register`")
    ask.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="generation option, e.g. top_k=3 (repeatable)")
    _add_gateway_arguments(ask)
    ask.add_argument("--json", action="store_true", help="print the gateway's whole response as JSON")
    sup = sub.add_parser(
        "support-set", help="register, list or delete a gateway's few-shot support sets",
        description="Register labelled support photos once under a name (the gateway keeps what it makes of them), "
        "then ask with `encode QUERY --server URL --support-set NAME`; list or delete the registered sets.",
    )
    sup.add_argument("action", choices=("register", "list", "delete"))
    sup.add_argument("name", nargs="?", default="", help="the set's name (register, delete)")
    sup.add_argument("examples", nargs="*", metavar="PHOTO=LABEL", help="register: the labelled support photos")
    sup.add_argument("--server", metavar="URL", required=True, help="gateway base URL, e.g. http://127.0.0.1:8000")
    sup.add_argument("--backend", help="register: the few-shot backend that describes them (default: the first doing fewshot)")
    _add_encoding_arguments(sup)
    _add_gateway_arguments(sup)
    dec = sub.add_parser("decode", help=".cnk bitstream -> image with g_s", description="Reconstruct the image a bitstream holds.")
    dec.add_argument("bitstream", help=".cnk file written by `comneck-edge encode`")
    dec.add_argument("-o", "--output", required=True, help="image file to write (format from the suffix, e.g. recon.png)")
    for p in (enc, dec):
        p.add_argument("--force", action="store_true", help="overwrite the output file if it exists")
    weights_help = ("ELIC weights, the same as the gateway's: our safetensors, a weights folder (`comneck convert`, a training export), "
                    "a release d1_1.pth.tar, an ELIC_LLM or CompressAI checkpoint; default: seeded random")
    dec.add_argument("--codec-weights", help=weights_help)
    for p in (enc, sup):
        p.add_argument("--codec-weights", action="append", help=weights_help + "; repeat it for several rate points, with --max-bytes "
                       "or --target-bpp (each file's rate known from its name or manifest)")
    for p in (enc, dec, sup):
        p.add_argument("--preset", choices=sorted(PRESETS), help="model sizes (default: tiny; with --onnx, the folder's, "
                       "and another one is refused)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "onnx", False) is None and os.environ.get("COMNECK_EDGE_ONNX"):
        args.onnx = [os.environ["COMNECK_EDGE_ONNX"]]
    from . import commands  # only now: torch and the codec take seconds to import

    run = {"encode": commands.encode, "decode": commands.decode, "support-set": commands.support_set}[args.command]
    return run_command("comneck-edge", lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
