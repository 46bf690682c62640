"""The weights folder: ComNeck's one on-disk form of a set of trained networks.

``comneck convert`` and training exports both write it; the server, the edge client and the
importers read it. It holds one safetensors state dict per network (``codec``, ``neck``,
``clip``, ``unet``) and the manifest ``comneck.json``: ``format``, ``version``, ``preset``,
``parts`` (the networks present), then what the writer knows (codec architecture, scenario,
rate, lambda, codec fingerprint, source, training summary).

A folder appears whole or not at all: it is written beside its place, synced, then renamed.
This module knows files only, not networks, so it sits below the importers and the trainer.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoints import fsync_path, save_state_dict
from .errors import ComneckInputError, ErrorCode

MANIFEST = "comneck.json"
FORMAT = "comneck-weights"
VERSION = 1


def read_manifest(folder: Path) -> dict[str, Any]:
    """The ``comneck.json`` of a weights folder."""
    path = folder / MANIFEST
    if not path.is_file():
        raise ComneckInputError(
            f"{folder} is a folder without {MANIFEST}: not written by `comneck convert` or a training export", ErrorCode.BAD_WEIGHTS
        )
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ComneckInputError(f"{path}: not valid JSON ({exc})", ErrorCode.BAD_WEIGHTS) from None


def part_file(folder: Path, part: str) -> Path:
    """``folder/{part}.safetensors`` of a weights folder, or a one-line error."""
    path = folder / f"{part}.safetensors"
    if not path.is_file():
        raise ComneckInputError(f"{folder} holds no {part} weights ({path.name} is missing)", ErrorCode.BAD_WEIGHTS)
    return path


def check_target(target: Path, force: bool = False) -> None:
    """Refuse to write over a file, or over a non-empty folder unless ``force``; callers with slow
    work ahead check first, so a refusal comes before the work."""
    if target.exists() and not target.is_dir():
        raise ComneckInputError(f"{target} exists and is not a folder; choose another folder", ErrorCode.BAD_OUTPUT)
    if target.exists() and any(target.iterdir()) and not force:
        raise ComneckInputError(f"{target} exists and is not empty; choose another folder or pass --force", ErrorCode.BAD_OUTPUT)


def write_folder(target: str | Path, preset: str, parts: Mapping[str, nn.Module | Mapping[str, torch.Tensor]],
                 details: Mapping[str, Any], force: bool = False) -> dict[str, Any]:
    """Write ``parts`` as ``{part}.safetensors`` into the folder ``target`` with a manifest of the
    format, the preset, the parts and then ``details``, replacing the folder whole (a non-empty
    one only with ``force``); returns the manifest."""
    target = Path(target)
    check_target(target, force)
    manifest = {"format": FORMAT, "version": VERSION, "preset": preset, "parts": list(parts), **details}
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.tmp"
    staging.mkdir()  # its mode from the umask, as for any folder (tempfile.mkdtemp's would be 0700)
    old = staging.with_name(f"{staging.name}.old")
    try:
        for part, weights in parts.items():
            save_state_dict(weights, staging / f"{part}.safetensors")
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        for path in [*staging.iterdir(), staging]:
            fsync_path(path)
        if target.exists():
            target.rename(old)  # from here to the next rename the target is briefly absent, never partial
        staging.rename(target)
        fsync_path(target.parent)
    finally:
        if old.exists() and not target.exists():  # the new folder did not arrive: keep the old one
            old.rename(target)
        for leftover in (staging, old):
            if leftover.exists():
                shutil.rmtree(leftover)
    return manifest
