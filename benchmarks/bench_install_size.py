"""Disk size of an edge (or server) install: the lock, whose Linux torch is PyPI's CUDA build,
against the CPU-only lock (``requirements/SET-cpu.txt``), each in a new venv.

The baseline in the same run is the ordinary lock. Prints each venv's size, the part that is
NVIDIA's libraries and Triton, and pip's time. ``--torch-wheels DIR`` installs torch and
torchvision for the CPU venv from wheel files in DIR instead of PyTorch's CPU index (for a
machine that cannot reach it); the output then names the files that stood in for the pinned
``+cpu`` pair, because its size is theirs.

``--set edge-lite`` measures the ONNX Runtime edge (``requirements/edge-lite.txt``: no torch, so
it has no CPU variant) against the smallest PyTorch edge, the CPU-only edge lock
(``requirements/edge-cpu.txt``, ``--torch-wheels`` as above), in the same run.

    python benchmarks/bench_install_size.py [--set edge|server|edge-lite] [--torch-wheels DIR] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CUDA_PARTS = re.compile(r"^(nvidia|cuda|triton)", re.IGNORECASE)


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def pip(venv: Path, *args: str) -> None:
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *args], check=True)


def measure(venv: Path, seconds: float) -> dict[str, float]:
    site = next(venv.glob("lib/python*/site-packages"))
    cuda = sum(tree_bytes(p) for p in site.iterdir() if CUDA_PARTS.match(p.name) and p.is_dir())
    return {"venv_mb": round(tree_bytes(venv) / 1e6), "nvidia_and_triton_mb": round(cuda / 1e6), "pip_s": round(seconds, 1)}


def build(venv: Path, steps: list[list[str]]) -> dict[str, float]:
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    start = time.perf_counter()
    for step in steps:
        pip(venv, *step)
    return measure(venv, time.perf_counter() - start)


def build_cpu(venv: Path, cpu_lock: Path, torch_wheels: Path | None) -> dict[str, object]:
    """A venv from a CPU-only lock: from PyTorch's CPU index, or with the torch pair from the wheels in ``torch_wheels``."""
    if torch_wheels is None:
        return build(venv, [["-r", str(cpu_lock)]])
    wheels = sorted(str(w) for w in torch_wheels.glob("torch*.whl"))
    rest = venv.parent / f"{venv.name}-rest.txt"  # the CPU lock without the pair and the index line; every pin, no resolving
    rest.write_text("".join(line + "\n" for line in cpu_lock.read_text().splitlines()
                            if not line.startswith(("torch==", "torchvision==", "--"))))
    result: dict[str, object] = build(venv, [["--no-deps", *wheels], ["--no-deps", "-r", str(rest)]])
    result["torch_stand_ins"] = [Path(w).name for w in wheels]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", default="edge", choices=("edge", "server", "edge-lite"),
                        help="which lock (default edge); edge-lite: the ONNX edge against the CPU-only PyTorch edge")
    parser.add_argument("--torch-wheels", type=Path, help="folder with the torch and torchvision wheels for the CPU venv")
    parser.add_argument("--keep", type=Path, help="build the venvs here and keep them (default: a temporary folder)")
    args = parser.parse_args()
    requirements = ROOT / "requirements"
    work = args.keep or Path(tempfile.mkdtemp(prefix="comneck-size-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result: dict[str, object] = {"set": args.set, "python": sys.version.split()[0]}
        if args.set == "edge-lite":  # no torch in it, so no CPU variant: the baseline is the CPU-only torch edge
            result["edge_cpu"] = build_cpu(work / "edge-cpu", requirements / "edge-cpu.txt", args.torch_wheels)
            result["edge_lite"] = build(work / "edge-lite", [["-r", str(requirements / "edge-lite.txt")]])
            result["lite_saves_mb"] = result["edge_cpu"]["venv_mb"] - result["edge_lite"]["venv_mb"]
        else:
            result["lock"] = build(work / "lock", [["-r", str(requirements / f"{args.set}.txt")]])
            result["cpu"] = build_cpu(work / "cpu", requirements / f"{args.set}-cpu.txt", args.torch_wheels)
            result["cpu_saves_mb"] = result["lock"]["venv_mb"] - result["cpu"]["venv_mb"]
        print(json.dumps(result, indent=2))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
