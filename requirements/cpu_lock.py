"""Write the CPU-only variants of the edge and server locks (``requirements/{edge,server}-cpu.txt``).

PyPI's Linux torch is the CUDA build: with its NVIDIA libraries an edge venv is about 5.8 GB.
PyTorch publishes CPU-only builds of the same releases (local version ``+cpu``) on its own
index. A resolver cannot reach that index here, so the CPU files are written from the locks
themselves: the same pins, torch and torchvision as the ``+cpu`` pair of the same versions
(macOS wheels on PyPI are CPU-only already), and without the packages that only the CUDA build
needs. ``make lock`` runs this; ``tests/test_lock.py`` checks the files match the locks.
The ``edge-lite`` set (the ONNX Runtime edge) holds no torch, so it needs no CPU variant.

    python requirements/cpu_lock.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETS = ("edge", "server")
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
#: What the CUDA build of torch pulls in: NVIDIA's libraries, their Python bindings, Triton.
CUDA_ONLY = re.compile(r"^(nvidia-|cuda-|triton$)")
TORCH_PAIR = ("torch", "torchvision")
_PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^ ;]+)(.*)$")


def _blocks(text: str) -> list[list[str]]:
    """The lock's entries: a pin line and the ``# via`` comment lines under it (the header is the first block)."""
    blocks: list[list[str]] = [[]]
    for line in text.splitlines():
        if _PIN.match(line):
            blocks.append([])
        blocks[-1].append(line)
    return blocks


def cpu_variant(text: str, name: str) -> str:
    """The lock ``text`` of set ``name`` with PyTorch's CPU-only build in place of the CUDA one."""
    out = [
        f"# The {name} set with PyTorch's CPU-only build: no NVIDIA libraries. Written by `make lock`",
        f"# (requirements/cpu_lock.py) from requirements/{name}.txt; do not edit. Install:",
        f"#    pip install -r requirements/{name}-cpu.txt && pip install --no-deps .",
        f"--extra-index-url {CPU_INDEX}",
    ]
    for block in _blocks(text)[1:]:
        package, pinned, marker = _PIN.match(block[0]).groups()  # type: ignore[union-attr]
        if CUDA_ONLY.match(package):
            continue
        if package in TORCH_PAIR:
            condition = f"({marker.lstrip(' ;')}) and " if marker else ""
            block = [f"{package}=={pinned}+cpu ; {condition}sys_platform != 'darwin'",
                     f"{package}=={pinned} ; {condition}sys_platform == 'darwin'", *block[1:]]
        out += [line for line in block if not CUDA_ONLY.match(line.strip().lstrip("#").strip())]
    return "\n".join(out) + "\n"


def main() -> int:
    for name in SETS:
        source = HERE / f"{name}.txt"
        (HERE / f"{name}-cpu.txt").write_text(cpu_variant(source.read_text(), name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
