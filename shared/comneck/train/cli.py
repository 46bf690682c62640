"""``comneck-train``: train a transform-neck (d1), codec + neck (d2, d3) or the post-processing U-Net.

    comneck-train config.yaml [--set key.path=value ...] [--scenario d1] [--rate 1] [--resume]

Settings come from the YAML file, then ``--set`` overrides, then the shortcut flags
(docs/training.md lists them all). Under ``torchrun --nproc-per-node N`` each process
trains on its share of every batch (DistributedDataParallel).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch.distributed as dist

from ..version import __version__
from ..errors import run_command
from .config import load_config
from .trainer import Trainer

SHORTCUTS = {
    "scenario": "scenario",
    "rate": "rate",
    "preset": "preset",
    "data": "data.root",
    "classes": "data.classes",
    "batch_size": "batch_size",
    "device": "device",
    "amp": "amp",
    "workers": "workers",
    "output": "output",
    "seed": "seed",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="comneck-train",
        description="Train ComNeck with the surrogate loss through CLIP (never the LLM): scenario d1 (codec frozen, "
        "neck trains), d2 (codec for humans and machines), d3 (encoder for machines) or postproc (U-Net baseline), "
        "in the paper's three stages. Checkpoints are atomic; --resume continues exactly where a run stopped.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("config", nargs="?", help="YAML config (keys of comneck.train.config.TrainConfig)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. stages.0.epochs=1 (repeatable)")
    parser.add_argument("--scenario", choices=("d1", "d2", "d3", "postproc"))
    parser.add_argument("--rate", type=int, help="rate index 1..4 (lambda 0.004..0.032)")
    parser.add_argument("--preset", help="model sizes: tiny or paper")
    parser.add_argument("--data", help="ImageFolder root (data.root)")
    parser.add_argument("--classes", help="class names file, .txt or .json (data.classes)")
    parser.add_argument("--epochs", help="epochs per stage, e.g. 20,20,20")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--device", help="cpu, cuda (under torchrun: each process its own GPU)")
    parser.add_argument("--amp", choices=("off", "bf16", "fp16"), help="mixed precision for neck, CLIP and U-Net")
    parser.add_argument("--workers", type=int, help="data-loader worker processes")
    parser.add_argument("--output", help="output folder: checkpoints/, log.jsonl, export/")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the output folder")
    parser.add_argument("--stop-after-steps", type=int, help="stop (with a checkpoint) after this many steps")
    return parser


def _train(args: argparse.Namespace) -> str:
    overrides = list(args.set)
    for flag, key in SHORTCUTS.items():
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.epochs:
        for i, n in enumerate(args.epochs.split(",")):
            overrides.append(f"stages.{i}.epochs={n}")
    config = load_config(args.config, overrides)
    if "LOCAL_RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if config.device.startswith("cuda") else "gloo")
        if config.device == "cuda":
            config = config.model_copy(update={"device": f"cuda:{os.environ['LOCAL_RANK']}"})
    trainer = Trainer(config)
    resumed = trainer.resume() if args.resume else False
    summary = trainer.run(args.stop_after_steps)
    prefix = f"resumed at step {trainer.position['global_step']}; " if resumed else ""
    return prefix + json.dumps(summary, indent=2)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_command("comneck-train", lambda: _train(args))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
