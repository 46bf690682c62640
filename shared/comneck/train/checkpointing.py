"""Training checkpoints that a kill cannot break.

A checkpoint is a folder ``checkpoints/step-NNNNNNNN/`` with ``weights.safetensors`` (every
trainable network, keys prefixed ``neck.``, ``codec.``, ``unet.``), ``state.json`` (config,
stage, epoch, step) and ``training.pt`` (optimizer, scaler and RNG states). It is written
under a temporary name and renamed when complete; the file ``checkpoints/latest`` names the
newest and is itself replaced atomically.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..checkpoints import fsync_path
from ..errors import ComneckInputError, ErrorCode


def rng_state() -> dict[str, Any]:
    """Every random generator a training step draws from."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # plain tensors and numbers only, so the file loads with weights_only=True
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss}
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(root: Path, step: int, modules: dict[str, nn.Module], state: dict[str, Any], training: dict[str, Any], keep: int) -> Path:
    """Write checkpoint ``step`` under ``root/checkpoints`` and point ``latest`` at it; keep the newest ``keep``."""
    folder = root / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:08d}"
    tmp = folder / f".step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = {f"{name}.{k}": v.detach().cpu().contiguous().clone() for name, m in modules.items() for k, v in m.state_dict().items()}
    save_file(weights, str(tmp / "weights.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state, indent=2, default=str))
    torch.save(training, tmp / "training.pt")
    for name in ("weights.safetensors", "state.json", "training.pt"):
        fsync_path(tmp / name)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(folder)
    _write_atomic(folder / "latest", final.name.encode())
    for old in sorted(p for p in folder.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    pointer = root / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = root / "checkpoints" / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


#: what a run writes into its output folder (the text-embedding cache is keyed, so it stays)
RUN_FILES = ("checkpoints", "log.jsonl", "tensorboard", "export")


def prepare_output(root: Path, resume: bool, force: bool, clear: bool = True) -> None:
    """Check the output folder before any slow work: ``resume`` needs a checkpoint there, a new
    run needs a folder without an earlier run's files, or ``force`` (which deletes those files
    where ``clear``: one process of a run does it). A re-run never appends to an old log."""
    if resume:
        if latest_checkpoint(root) is None:
            raise ComneckInputError(f"--resume: no checkpoint in {root / 'checkpoints'}; drop --resume to start a new run", ErrorCode.BAD_CHECKPOINT)
        return
    found = [name for name in RUN_FILES if (root / name).exists()]
    if found and not force:
        raise ComneckInputError(f"{root} holds an earlier run ({', '.join(found)}); pass --resume to continue it or --force to start afresh", ErrorCode.BAD_OUTPUT)
    for name in found if clear else ():
        path = root / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def load_checkpoint(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any], dict[str, Any]]:
    """(weights per network, state, training state) of a checkpoint folder."""
    try:
        flat = load_file(str(path / "weights.safetensors"))
        state = json.loads((path / "state.json").read_text())
        training = torch.load(path / "training.pt", weights_only=True)
    except (OSError, ValueError) as exc:
        raise ComneckInputError(f"checkpoint {path} is unreadable: {exc}", ErrorCode.BAD_CHECKPOINT) from None
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        name, _, rest = key.partition(".")
        weights.setdefault(name, {})[rest] = tensor
    return weights, state, training
