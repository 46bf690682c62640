"""``comneck-train``: train a transform-neck (d1), codec + neck (d2, d3) or the post-processing U-Net.

    comneck-train config.yaml [--set key.path=value ...] [--scenario d1] [--rate 1] [--resume | --force]

Settings come from the YAML file, then ``--set`` overrides, then the shortcut flags
(docs/training.md lists them all). Under ``torchrun --nproc-per-node N`` each process
trains on its share of every batch (DistributedDataParallel).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import TYPE_CHECKING

from ..version import __version__
from ..errors import run_command
from .config import load_config
from .interrupt import Interrupted

if TYPE_CHECKING:
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
    parser.add_argument("--amp", help="mixed precision for neck, CLIP and U-Net: off, bf16 or fp16 (on = bf16)")
    parser.add_argument("--workers", type=int, help="data-loader worker processes")
    parser.add_argument("--output", help="output folder: checkpoints/, log.jsonl, export/")
    parser.add_argument("--seed", type=int)
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the output folder")
    again.add_argument("--force", action="store_true", help="start afresh in an output folder that holds an earlier run, deleting its "
                       "checkpoints, log, TensorBoard scalars and export")
    parser.add_argument("--stop-after-steps", type=int, help="stop (with a checkpoint) after this many steps")
    return parser


def resume_command(argv: list[str], world: int = 1) -> str:
    """The command that continues this run: its arguments with ``--resume``, without ``--force``
    and ``--stop-after-steps``."""
    kept: list[str] = []
    skip_value = False
    for arg in argv:
        if skip_value or arg in ("--force", "--resume") or arg.startswith("--stop-after-steps="):
            skip_value = False
            continue
        if arg == "--stop-after-steps":
            skip_value = True
            continue
        kept.append(arg)
    launcher = ["torchrun", "--nproc-per-node", str(world), "-m", "comneck.train.cli"] if world > 1 else ["comneck-train"]
    return shlex.join([*launcher, *kept, "--resume"])


def banner(trainer: Trainer, resumed: bool) -> str:
    """What is about to train, on what, for how long, and which networks hold random weights."""
    config = trainer.config
    start = f"resuming at step {trainer.position['global_step']} of {trainer.total_steps()}" if resumed else f"{trainer.total_steps()} steps"
    epochs = "/".join(str(stage.epochs) for stage in config.stages)
    random = ", ".join(trainer.random_parts) or "none"
    teacher = " (the teacher CLIP is random: set clip_pretrained or clip_weights for a useful neck)" if "clip" in trainer.random_parts else ""
    processes = f" x {trainer.world} processes" if trainer.world > 1 else ""
    return (f"comneck-train: {config.scenario} at rate {config.rate}, preset {config.preset}, on {trainer.device} (amp {config.amp}): "
            f"{len(trainer.dataset)} images in {len(trainer.class_names)} classes, batch {config.batch_size}{processes}, "
            f"epochs {epochs}, {start}\n"
            f"comneck-train: random weights in: {random}{teacher}")


def _train(args: argparse.Namespace, argv: list[str]) -> str:
    import torch.distributed as dist  # here, not at the top: --help and argument mistakes need no torch

    from .checkpointing import prepare_output
    from .trainer import Trainer

    overrides = list(args.set)
    for flag, key in SHORTCUTS.items():
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.epochs:
        for i, n in enumerate(args.epochs.split(",")):
            overrides.append(f"stages.{i}.epochs={n}")
    config = load_config(args.config, overrides)
    prepare_output(config.output, args.resume, args.force, clear=os.environ.get("RANK", "0") == "0")
    if "LOCAL_RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if config.device.startswith("cuda") else "gloo")
        if config.device == "cuda":
            config = config.model_copy(update={"device": f"cuda:{os.environ['LOCAL_RANK']}"})
    trainer = Trainer(config)
    if args.resume:
        trainer.resume()
    if trainer.rank == 0:
        print(banner(trainer, args.resume), file=sys.stderr)
    summary = trainer.run(args.stop_after_steps)
    if "stopped_at" in summary and trainer.rank == 0:
        print(f"comneck-train: stopped at step {trainer.position['global_step']}; resume with: {resume_command(argv, trainer.world)}", file=sys.stderr)
    return json.dumps(summary, indent=2)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    import torch.distributed as dist

    try:
        return run_command("comneck-train", lambda: _train(args, argv))
    except Interrupted as stopped:  # Ctrl-C or SIGTERM: the trainer saved a checkpoint at a step boundary
        if stopped.checkpoint is not None:
            world = dist.get_world_size() if dist.is_initialized() else 1
            print(f"comneck-train: {stopped}; checkpoint saved in {stopped.checkpoint}\n"
                  f"comneck-train: resume with: {resume_command(argv, world)}", file=sys.stderr)
        return 128 + stopped.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
    except KeyboardInterrupt:  # Ctrl-C before training started, or a second one during a step
        print("comneck-train: interrupted; nothing saved since the last checkpoint", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
