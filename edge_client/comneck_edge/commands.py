"""What ``comneck-edge``'s commands do, once its arguments are parsed.

Kept apart from the parser in ``cli.py`` so that ``comneck-edge --help`` and argument mistakes
answer without importing torch and the codec (seconds on a small device).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from comneck.bitstream import Bitstream
from comneck.errors import ComneckInputError
from comneck.presets import get_preset
from comneck.provenance import RANDOM_WEIGHTS_NOTE

from .client import GatewayClient
from .encoded import EncodedImage
from .onnx_edge import OnnxEdgeEncoder
from .rate_control import RateLadder
from .report import format_answer

if TYPE_CHECKING:
    from .encoder import EdgeEncoder


def _options(pairs: list[str]) -> dict[str, Any]:
    """``--option key=value`` pairs; values are read as JSON where they parse (numbers, booleans)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ComneckInputError(f"--option wants KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _fresh(path: Path, force: bool) -> Path:
    """An output path that may be written: a file already there needs ``--force``."""
    if path.exists() and not force:
        raise ComneckInputError(f"{path} exists: pass --force to overwrite it")
    return path


def _has_torch() -> bool:
    return importlib.util.find_spec("torch") is not None


def _runtime(args: argparse.Namespace) -> str:
    """``--runtime``: ``auto`` is the ONNX edge when an ONNX folder is given or PyTorch is absent."""
    if args.runtime == "onnx" and not args.onnx:
        raise ComneckInputError("--runtime onnx needs --onnx FOLDER (or COMNECK_EDGE_ONNX), a folder `comneck export-edge` wrote")
    if args.runtime == "torch" and args.onnx:
        raise ComneckInputError("--onnx FOLDER is for the ONNX runtime; drop it (or COMNECK_EDGE_ONNX) to encode with --runtime torch")
    if args.runtime != "auto":
        return args.runtime
    if args.onnx:
        return "onnx"
    if not _has_torch():
        raise ComneckInputError("PyTorch is not installed: encode with the ONNX edge, --onnx FOLDER (written by `comneck export-edge`), "
                                "or install the torch edge: pip install 'comneck[edge]'")
    return "torch"


def _onnx_encoder(args: argparse.Namespace, folder: str) -> OnnxEdgeEncoder:
    """The ONNX edge over one ``--onnx`` folder, refused when it was exported for another preset, rate or weights than the flags name."""
    if args.entropy_params != "fixed":
        raise ComneckInputError("the ONNX edge writes fixed-point entropy parameters only: drop --entropy-params float")
    encoder = OnnxEdgeEncoder(folder, resize=args.resize)
    fingerprint = None
    if args.codec_weights:
        if not _has_torch():
            raise ComneckInputError("--codec-weights needs PyTorch to read the weights; the ONNX folder carries its own: drop --codec-weights")
        if len(args.codec_weights) > 1 or len(args.onnx) > 1:
            raise ComneckInputError("--codec-weights checks one ONNX folder's weights: give one of each")
        from comneck.models import build_codec

        fingerprint = build_codec(get_preset(args.preset or encoder.preset_name), args.codec_weights[0]).fingerprint()
    encoder.check(args.preset, args.rate, fingerprint)
    return encoder


def _rate_points(args: argparse.Namespace) -> list[EdgeEncoder | OnnxEdgeEncoder]:
    """One encoder per ``--onnx`` folder, or per ``--codec-weights`` file (the seeded codec when none)."""
    if _runtime(args) == "onnx":
        return [_onnx_encoder(args, folder) for folder in args.onnx]
    from .encoder import EdgeEncoder

    weights = args.codec_weights or [None]
    if len(weights) > 1 and args.rate is not None:
        raise ComneckInputError("--rate names one rate point; several --codec-weights carry their own rates: drop --rate")
    return [EdgeEncoder(args.preset or "tiny", rate=args.rate, resize=args.resize, codec_weights=w, fixed_point=args.entropy_params == "fixed")
            for w in weights]


def _encoder(args: argparse.Namespace) -> EdgeEncoder | OnnxEdgeEncoder | RateLadder:
    """The encoder the encoding flags describe (``encode`` and ``support-set register`` share them): one
    rate point, or with ``--max-bytes`` / ``--target-bpp`` the ladder of those given."""
    max_bytes, target_bpp = getattr(args, "max_bytes", None), getattr(args, "target_bpp", None)
    if max_bytes is not None and target_bpp is not None:
        raise ComneckInputError("give one budget: --max-bytes or --target-bpp")
    points = _rate_points(args)
    if max_bytes is None and target_bpp is None:
        if len(points) > 1:
            raise ComneckInputError("several rate points (--onnx or --codec-weights given more than once) go with --max-bytes or --target-bpp")
        return points[0]
    return RateLadder(points, max_bytes, target_bpp)


def _labelled(pairs: list[str], encoder: EdgeEncoder | OnnxEdgeEncoder | RateLadder) -> list[tuple[bytes, str]]:
    """``PHOTO=LABEL`` pairs -> (bitstream, label), each photo encoded as the query is."""
    out = []
    for pair in pairs:
        photo, sep, label = pair.rpartition("=")
        if not sep or not photo or not label.strip():
            raise ComneckInputError(f"a support example is PHOTO=LABEL, got {pair!r}")
        out.append((encoder.encode_file(photo).data, label))
    return out


def _client(args: argparse.Namespace) -> GatewayClient:
    api_key = args.api_key or os.environ.get("COMNECK_API_KEY")
    return GatewayClient(args.server, api_key=api_key, timeout=args.timeout, retries=args.retries)


def _write(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except OSError as exc:
        raise ComneckInputError(f"cannot write {path}: {exc.strerror}") from None


def _ask(args: argparse.Namespace, client: GatewayClient, encoded: EncodedImage, support: list[tuple[bytes, str]] | None) -> str:
    """Ask the gateway about ``encoded`` with the command's question (``support``: the encoded
    --support examples, made once per command)."""
    options = _options(args.option)
    task = args.task or ("fewshot" if support or args.support_set else None)
    start = time.perf_counter()
    response = client.infer(encoded.data, args.prompt or "", task, args.backend, options, fmt=args.format,
                            choices=args.choice or None, support=support, support_set=args.support_set)
    round_trip_ms = (time.perf_counter() - start) * 1e3
    if args.json:
        return json.dumps({**response, "edge_timings_ms": encoded.timings_ms, "round_trip_ms": round_trip_ms}, indent=2)
    return format_answer(encoded, response, round_trip_ms)


def _check_asking(args: argparse.Namespace) -> None:
    """--server and the question's flags go together."""
    few_shot = bool(args.support or args.support_set)
    if args.server and args.prompt is None and not few_shot and args.task != "caption":
        raise ComneckInputError("--server needs --prompt (the question for the model; none for --task caption)")
    if (args.prompt is not None or few_shot) and not args.server:
        raise ComneckInputError("--prompt, --support and --support-set go with --server URL (offline encoding asks no model)")


def _photos(folder: Path) -> list[Path]:
    """The photos of a folder (not its subfolders), by name: files with a suffix Pillow reads."""
    from PIL import Image

    readable = set(Image.registered_extensions())
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in readable)
    if not found:
        raise ComneckInputError(f"{folder} holds no photos (files Pillow reads: .jpg, .png, ...)")
    return found


def encode_folder(args: argparse.Namespace) -> str:
    """Every photo of a folder -> one container each in ``--output`` (default: beside the photos),
    ``--jobs`` at a time, with a progress bar; with ``--server``, each asked as it is encoded, at
    most ``--jobs`` requests in flight. Outputs that exist need ``--force`` (checked before any work)."""
    from tqdm import tqdm

    photos = _photos(Path(args.image))
    folder = Path(args.output) if args.output else None
    targets = [(folder / p.name if folder else p).with_suffix(".cnk") for p in photos] if folder or not args.server else []
    for target in targets:
        _fresh(target, args.force)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    encoder = _encoder(args)
    support = _labelled(args.support, encoder) or None  # encoded once, sent with every photo
    client = _client(args) if args.server else None  # one client (its connections) for every request

    def one(index: int) -> str:
        encoded = encoder.encode_file(photos[index])
        if targets:
            _write(targets[index], encoded.data)
        line = f"{targets[index] if targets else photos[index].name}: {len(encoded.data)} bytes, {encoded.bpp:.4f} bpp"
        if encoded.rate_choice:
            line += f", {encoded.rate_choice}"
        if client is not None:
            line += "\n" + _ask(args, client, encoded, support)
        return line

    with ThreadPoolExecutor(args.jobs) as pool, tqdm(total=len(photos), desc="encoding", unit="photo", disable=None) as bar:
        lines = []
        try:
            for line in pool.map(one, range(len(photos))):  # in the photos' order, whichever finishes first
                lines.append(line)
                bar.update()
        finally:
            if client is not None:
                client.close()
    params = "fixed-point" if encoder.fixed_point else "float"
    rates = (f"rate points {', '.join(str(p.rate) for p in encoder.points)}, the highest that fits each photo"
             if isinstance(encoder, RateLadder) else f"rate {encoder.rate}")
    lines.append(f"{len(photos)} photos, preset {encoder.preset_name}, {rates}, {params} entropy parameters")
    if encoder.random_weights and not args.server:
        lines.append(RANDOM_WEIGHTS_NOTE)
    return "\n".join(lines)


def encode(args: argparse.Namespace) -> str:
    _check_asking(args)
    if Path(args.image).is_dir():
        return encode_folder(args)
    encoder = _encoder(args)
    encoded = encoder.encode_file(args.image)
    out = Path(args.output) if args.output else None if args.server else Path(args.image).with_suffix(".cnk")
    if out is not None:
        _fresh(out, args.force)  # after reading the photo: a missing or unreadable one is the first thing to say
    lines = []
    if out is not None:
        _write(out, encoded.data)
        h, w = encoded.bitstream.image_size
        lines.append(f"{out}: {len(encoded.data)} bytes, {encoded.bpp:.4f} bpp ({w}x{h}, preset {encoder.preset_name}, "
                     f"rate {encoded.bitstream.rate}, {encoded.entropy_params} entropy parameters)")
    if encoded.rate_choice:
        lines.append(f"rate control: {encoded.rate_choice}")
    if args.server:
        with _client(args) as client:
            lines.append(_ask(args, client, encoded, _labelled(args.support, encoder) or None))
    elif encoder.random_weights:
        lines.append(RANDOM_WEIGHTS_NOTE)
    return "\n".join(lines)


def decode(args: argparse.Namespace) -> str:
    try:
        data = Path(args.bitstream).read_bytes()
    except OSError as exc:
        raise ComneckInputError(f"cannot read {args.bitstream}: {exc.strerror}") from None
    _fresh(Path(args.output), args.force)
    stream = Bitstream.from_bytes(data)
    if not _has_torch():
        raise ComneckInputError("decoding runs the synthesis g_s with PyTorch, which is not installed: pip install 'comneck[edge]'")
    import torch

    from comneck.image import padding_of, to_image, unpad
    from comneck.models import build_codec

    codec = build_codec(get_preset(args.preset or "tiny"), args.codec_weights)  # decode's flag names one file
    stream.check_codec(codec.config.arch, codec.fingerprint())
    with torch.inference_mode():
        x_hat = codec.synthesize(codec.entropy_decode(stream.latents))
    image = to_image(unpad(x_hat, padding_of(*stream.image_size)))
    try:
        image.save(args.output)
    except (OSError, ValueError) as exc:
        raise ComneckInputError(f"cannot write {args.output}: {exc}") from None
    note = f"\n{RANDOM_WEIGHTS_NOTE}" if args.codec_weights is None else ""
    return f"{args.output}: {image.width}x{image.height} reconstructed with g_s{note}"


def support_set(args: argparse.Namespace) -> str:
    if args.action != "list" and not args.name:
        raise ComneckInputError(f"support-set {args.action} needs the set's name")
    with _client(args) as client:
        if args.action == "list":
            sets = client.support_sets()
            return "\n".join(f"{s['name']}: {s['examples']} examples of {', '.join(s['classes'])} ({s['backend']})" for s in sets) \
                or "no support sets registered"
        if args.action == "delete":
            if args.examples:
                raise ComneckInputError("support-set delete takes only the set's name")
            gone = client.delete_support_set(args.name)
            return f"deleted {gone['name']} ({gone['examples']} examples)"
        if not args.examples:
            raise ComneckInputError("support-set register NAME needs PHOTO=LABEL examples")
        encoder = _encoder(args)
        made = client.register_support_set(args.name, _labelled(args.examples, encoder), args.backend, fmt=args.format)
        return f"registered {made['name']}: {made['examples']} examples of {', '.join(made['classes'])} ({made['backend']})"
