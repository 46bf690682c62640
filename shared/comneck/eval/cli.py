"""``comneck-eval``: task quality against bits per pixel, for ComNeck and its baselines.

    comneck-eval run CONFIG.yaml [--set key.path=value ...] [--resume | --force] [--limit N] [--shard i/n] [--server URL]
    comneck-eval merge OUTPUT SHARD_FOLDER [SHARD_FOLDER ...]
    comneck-eval report FOLDER

docs/evaluation.md has the datasets, the commands behind each of the paper's figures and the protocols.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import run_command
from ..version import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="comneck-eval",
        description="Draw rate-accuracy curves: a task's quality against bits per pixel for ComNeck (d1/d2/d3) beside the "
        "reconstruction and post-processing baselines, the uncompressed image and JPEG / WebP / AVIF, with BD-rates, "
        "plots and an HTML report. Nothing is downloaded: datasets and weights are local folders.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="evaluate one config (results are written as they come)",
                              description="Evaluate the pipelines a config names on its dataset, writing results.jsonl line by "
                              "line, then summary.json, summary.md, the plots and report.html in the output folder.")
    run.add_argument("config", help="YAML config (keys of comneck.eval.config.EvalConfig; ready ones in configs/eval/)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. batch_size=4 (repeatable)")
    again = run.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="skip the items results.jsonl already holds (same config)")
    again.add_argument("--force", action="store_true", help="start afresh in an output folder that holds an earlier run")
    run.add_argument("--limit", type=int, metavar="N", help="only the first N items (a smoke run)")
    run.add_argument("--shard", metavar="I/N", help="this process's share: items I, I+N, ... (0-based); join the folders with merge")
    run.add_argument("--server", metavar="URL", help="send the comneck pipeline's containers to a running gateway over HTTP")
    run.add_argument("--output", metavar="DIR", help="output folder (config key output)")
    merge = commands.add_parser("merge", help="join the folders of a sharded run into one, then summarize",
                                description="Join the results of shard folders (runs of one config with --shard i/n) into OUTPUT "
                                "and write its summary, plots and report as one run would.")
    merge.add_argument("output", help="the joined run's folder (new, or with --force)")
    merge.add_argument("shards", nargs="+", help="the shard runs' output folders")
    merge.add_argument("--force", action="store_true", help="replace an existing OUTPUT")
    report = commands.add_parser("report", help="write the summary and report again from a folder's results",
                                 description="Recompute summary.json, summary.md, the plots and report.html from FOLDER's results.jsonl.")
    report.add_argument("folder")
    return parser


def _run(args: argparse.Namespace) -> str:
    from .config import load_eval_config
    from .harness import Shard, evaluate

    overrides = list(args.set)
    for flag, key in (("limit", "dataset.limit"), ("server", "server"), ("output", "output")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    config = load_eval_config(args.config, overrides)
    shard = Shard.parse(args.shard) if args.shard else Shard()
    return evaluate(config, resume=args.resume, force=args.force, shard=shard)


def _merge(args: argparse.Namespace) -> str:
    from .harness import merge

    return merge(Path(args.output), [Path(s) for s in args.shards], force=args.force)


def _report(args: argparse.Namespace) -> str:
    from .harness import report

    return report(Path(args.folder))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    command = {"run": _run, "merge": _merge, "report": _report}[args.command]
    try:
        return run_command("comneck-eval", lambda: command(args))
    except KeyboardInterrupt:  # every answered batch is in results.jsonl already
        print("comneck-eval: interrupted; what was answered is in results.jsonl: continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
