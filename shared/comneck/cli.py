"""``comneck``: the researcher's command line (complexity report, weight conversion, ONNX edge export)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .version import __version__
from .errors import ComneckInputError, ErrorCode, run_command
from .presets import PRESETS, get_preset


def _complexity(args: argparse.Namespace) -> str:
    from .complexity import complexity_report, format_report, report_json

    preset = get_preset(args.preset)
    split = preset.split_block if args.split is None else args.split
    size = preset.image_size if args.size is None else args.size
    report = complexity_report(preset, size=size, split_block=split)
    return json.dumps(report_json(report), indent=2) if args.json else format_report(report, preset, size, split)


def _convert(args: argparse.Namespace) -> str:
    if args.for_vllm:
        return _for_vllm(args)
    if args.tokenizer is not None:
        raise ComneckInputError("--tokenizer goes with --for-vllm", ErrorCode.BAD_SETTINGS)
    if args.base is not None:
        return _merge_shikra(args)
    if args.llama is not None:
        return _convert_llama_adapter(args)
    from .convert import convert

    manifest = convert(args.source, args.output, get_preset(args.preset), args.scenario, args.rate, args.force)
    if args.json:
        return json.dumps(manifest, indent=2)
    lines = [f"wrote {args.output}: {', '.join(p + '.safetensors' for p in manifest['parts'])} + comneck.json ({manifest['layout']} layout)"]
    if "codec" in manifest["parts"]:
        lam = f"lambda {manifest['lmbda']}" if manifest["lmbda"] else "rate unknown: pass --rate"
        lines.append(f"codec {manifest['codec_arch']}, scenario {manifest['scenario'] or 'unknown'}, rate {manifest['rate'] or '?'} ({lam}), "
                     f"fingerprint {manifest['codec_fingerprint']}")
    if manifest.get("clip_final_norm") == "twice":
        lines.append("clip final norm: twice (the neck was trained through the official code's CLIP, which applies ln_post "
                     "twice; the gateway does the same unless --clip-final-norm once overrides it)")
    if manifest.get("clip_missing_parts"):
        lines.append(f"clip lacks: {', '.join(manifest['clip_missing_parts'])} (they stay random; outputs that use them say so)")
    lines.append(f"serve: comneck-server --preset {args.preset} --weights {args.output}")
    return "\n".join(lines)


def _merge_shikra(args: argparse.Namespace) -> str:
    """``comneck convert DELTA --base LLAMA -o OUT``: the merged Shikra folder, written once."""
    from .backends.shikra import ShikraWeights, write_merged
    from .weights_folder import check_target

    check_target(args.output, args.force)
    weights = ShikraWeights(args.source, args.base)
    weights.config  # refuse a folder that is not Shikra's before the slow part
    files = write_merged(weights, args.output)
    return (f"wrote {args.output}: {len(files)} safetensors shard(s), config.json and the tokenizer (Shikra delta + LLaMA base, "
            f"merged as apply_delta.py does)\nserve: comneck-server --backend shikra={args.output}")


def _for_vllm(args: argparse.Namespace) -> str:
    """``comneck convert CHECKPOINT --for-vllm -o OUT``: the backend's LLaMA alone, for ``vllm serve OUT --enable-prompt-embeds``."""
    from .backends.vllm_export import write_for_vllm
    from .weights_folder import check_target

    check_target(args.output, args.force)
    backend, files = write_for_vllm(args.source, args.output, args.base, args.tokenizer)
    return (f"wrote {args.output}: {len(files)} safetensors shard(s), config.json (LlamaForCausalLM) and the tokenizer ({backend}'s "
            f"language model alone)\nserve: vllm serve {args.output} --enable-prompt-embeds, then comneck-server --backend "
            f"{backend}=CHECKPOINT,engine=vllm,engine_url=http://VLLM_HOST:8000")


def _convert_llama_adapter(args: argparse.Namespace) -> str:
    """``comneck convert CAPTION_ADAPTER.pth --llama LLAMA_DIR -o OUT``: the LLaMA-Adapter V1 caption model, converted once."""
    from .backends.llama_adapter import write_converted
    from .weights_folder import check_target

    check_target(args.output, args.force)
    files = write_converted(args.source, args.llama, args.output)
    return (f"wrote {args.output}: {len(files)} safetensors shard(s), config.json and tokenizer.model (Meta's LLaMA with wq/wk "
            f"permuted for transformers, the caption adapter)\nserve: comneck-server --backend llama-adapter-v1={args.output}")


def _export_edge(args: argparse.Namespace) -> str:
    """``comneck export-edge [WEIGHTS] -o FOLDER``: the codec's encoding half for the ONNX edge."""
    from .edge_export import export_edge
    from .models import RANDOM_WEIGHTS_NOTE, build_codec, codec_rate
    from .weights_folder import check_target

    check_target(args.output, args.force)
    preset = get_preset(args.preset)
    codec = build_codec(preset, args.weights)
    rate = codec_rate(codec, args.rate)
    manifest = export_edge(codec, preset, rate, args.output, random_weights=args.weights is None, force=args.force)
    if args.json:
        return json.dumps(manifest, indent=2)
    lines = [f"wrote {args.output}: analysis.onnx (g_a, h_a), {len(manifest['params'])} fixed-point parameter networks, tables.npz, "
             f"edge.json (preset {preset.name}, {manifest['arch']}, rate {rate}, fingerprint {manifest['fingerprint']})",
             f"encode without torch: comneck-edge encode photo.jpg --onnx {args.output}"]
    if args.weights is None:
        lines.append(RANDOM_WEIGHTS_NOTE)
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="comneck",
        description="ComNeck: compressed image latents -> transform-neck -> CLIP tail -> multimodal LLM.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    cx = sub.add_parser(
        "complexity",
        help="parameters and kMAC/pixel of every network, beside the paper's Table 3",
        description="Count parameters and multiply-accumulates per pixel of the neck, the ELIC parts, "
        "the U-Net baseline and the CLIP head/tail (random weights: counts need no checkpoint).",
    )
    cx.add_argument("--json", action="store_true", help='print {component: {"params", "kmac_per_pixel"}}')
    cx.add_argument("--size", type=int, help="square codec input side in pixels, a multiple of 64 (default: the preset's, 256 or 384)")
    cx.add_argument("--preset", default="paper", choices=sorted(PRESETS), help="model sizes (default: paper)")
    cx.add_argument("--split", type=int, default=None, help="CLIP blocks replaced by the neck (default: preset's, 2)")
    cx.set_defaults(func=_complexity)
    cv = sub.add_parser(
        "convert",
        help="import published weights (paper release, ELIC, CompressAI, open_clip, Hugging Face CLIP) into our layout",
        description="Read SOURCE safely (safetensors, or torch.load with weights_only=True; TorchScript archives "
        "give their state dict only), map its keys onto the preset's networks, check every key and shape, and "
        "write OUTPUT/{codec,neck,clip}.safetensors with OUTPUT/comneck.json. Release files d{1,2,3}_{1..4}.pth.tar "
        "name their scenario and rate; --scenario/--rate override or supply them. See docs/checkpoints.md.",
    )
    cv.add_argument("source", type=Path, help="weight file: d1_1.pth.tar, an ELIC .pth.tar, a CompressAI state dict, a CLIP .pt/.bin/.safetensors; "
                    "or the shikra-7b-delta-v1 folder with --base; or LLaMA-Adapter V1's caption adapter .pth with --llama")
    cv.add_argument("-o", "--output", type=Path, required=True, help="folder to write (must be new or empty unless --force)")
    cv.add_argument("--preset", default="paper", choices=sorted(PRESETS), help="network sizes the weights must fit (default: paper)")
    cv.add_argument("--scenario", choices=("d1", "d2", "d3"), help="training scenario, when the file name does not say")
    cv.add_argument("--rate", type=int, choices=(1, 2, 3, 4), help="rate index 1..4 (lambda 0.004..0.032), when the file name does not say")
    cv.add_argument("--base", type=Path, help="with a Shikra delta folder as SOURCE: its LLaMA-7B base (Hugging Face format); "
                    "OUTPUT becomes the merged Shikra folder for `comneck-server --backend shikra=OUTPUT`")
    cv.add_argument("--llama", type=Path, help="with llama_adapter_len10_layer30_caption_vit_l.pth as SOURCE: Meta's LLaMA-7B folder "
                    "(params.json, consolidated.00.pth, tokenizer.model); OUTPUT becomes the folder for "
                    "`comneck-server --backend llama-adapter-v1=OUTPUT`")
    cv.add_argument("--for-vllm", action="store_true", help="with a Shikra (merged, or delta with --base), Honeybee or LLaVA checkpoint "
                    "folder as SOURCE: OUTPUT becomes its language model alone as a LlamaForCausalLM folder, for `vllm serve OUTPUT "
                    "--enable-prompt-embeds` behind `--backend NAME=SOURCE,engine=vllm,engine_url=URL`")
    cv.add_argument("--tokenizer", type=Path, help="with --for-vllm and a Honeybee folder without tokenizer.model: Vicuna-7B v1.5's "
                    "(a folder or the file)")
    cv.add_argument("--force", action="store_true", help="replace a non-empty OUTPUT")
    cv.add_argument("--json", action="store_true", help="print the manifest as JSON")
    cv.set_defaults(func=_convert)
    ex = sub.add_parser(
        "export-edge",
        help="the codec's encoding half as ONNX files, for comneck-edge on a device without PyTorch",
        description="Write FOLDER/analysis.onnx (g_a and h_a, float32), FOLDER/params/*.onnx (the entropy-parameter "
        "networks in exact fixed point), FOLDER/tables.npz (rANS tables) and FOLDER/edge.json (preset, codec, rate, "
        "fingerprint). `comneck-edge encode PHOTO --onnx FOLDER` then writes the containers the gateway decodes, "
        "with ONNX Runtime and numpy alone. See docs/edge.md.",
    )
    ex.add_argument("weights", type=Path, nargs="?", help="codec weights (any form `comneck convert` reads, or its output folder); "
                    "default: the preset's seeded random weights")
    ex.add_argument("-o", "--output", type=Path, required=True, help="folder to write (must be new or empty unless --force)")
    ex.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="network sizes the weights fit (default: tiny)")
    ex.add_argument("--rate", type=int, choices=(1, 2, 3, 4), help="rate index the containers name (default: the weights' own, else 1)")
    ex.add_argument("--force", action="store_true", help="replace a non-empty OUTPUT")
    ex.add_argument("--json", action="store_true", help="print the manifest as JSON")
    ex.set_defaults(func=_export_edge)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command("comneck", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
