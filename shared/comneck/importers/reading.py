"""Open any weight file the importers accept, without running code from it.

* safetensors: read as is (preferred: no code, no pickle);
* ``torch.save`` files (``.pth``, ``.pth.tar``, ``.pt``, ``.bin``): ``torch.load(weights_only=True)``,
  which refuses any Python object but tensors, containers and numbers. ``collections.Counter``
  is allowed because PyTorch's MultiStepLR keeps its milestones in one (the release files'
  ``lr_scheduler`` entry);
* TorchScript archives (OpenAI's original CLIP ``.pt``): ``torch.jit.load`` and only the
  state dict is kept; TorchScript's loader rebuilds tensors and its own typed modules and never
  unpickles arbitrary Python.
"""

from __future__ import annotations

import collections
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ..errors import ComneckInputError, ErrorCode

#: Globals a weights_only load may meet in the files we import, beyond PyTorch's own allow-list.
SAFE_GLOBALS = [collections.Counter]


def _bad(path: Path, what: str, why: str) -> ComneckInputError:
    return ComneckInputError(f"{what} weights: {path}: {why}", ErrorCode.BAD_WEIGHTS)


def file_format(path: Path) -> str | None:
    """``safetensors``, ``torchscript``, ``torch`` (a torch.save zip or legacy pickle) or None,
    from the first bytes and the zip listing only."""
    with open(path, "rb") as f:
        head = f.read(16)
    if path.suffix == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{"):  # 8-byte length, then JSON
        return "safetensors"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        # TorchScript archives carry their code and constants; torch.save zips only data.pkl + tensors
        scripted = any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names)
        return "torchscript" if scripted else "torch"
    return "torch" if head[:1] == b"\x80" else None  # pickle protocol 2+ opcode


def check_source(path: str | Path, what: str) -> str | None:
    """Refuse a missing path, a folder without a manifest or a file in no weight format, reading
    only headers (a start-up check that does not load gigabytes twice); the file's
    :func:`file_format`, None for a folder."""
    path = Path(path)
    if path.is_dir():
        if not (path / "comneck.json").is_file():
            raise _bad(path, what, "a folder without comneck.json (not written by `comneck convert`)")
        return None
    if not path.is_file():
        raise _bad(path, what, "no such file")
    kind = file_format(path)
    if kind is None:
        raise _bad(path, what, "not a safetensors, torch.save or TorchScript file")
    if kind == "safetensors":
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError, ValueError) as exc:
            raise _bad(path, what, f"not a readable safetensors file ({exc})") from None
    return kind


def read_weights(path: str | Path, what: str) -> Any:
    """The object stored in a weight file (a state dict, or a release dict holding several),
    or a one-line ``bad_weights`` error naming ``what`` it was for."""
    path = Path(path)
    kind = check_source(path, what)
    if kind == "safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise _bad(path, what, f"not a readable safetensors file ({exc})") from None
    if kind == "torchscript":
        try:
            with warnings.catch_warnings():  # torch deprecates TorchScript; OpenAI's CLIP file is one nonetheless
                warnings.simplefilter("ignore", FutureWarning)
                return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        except RuntimeError as exc:
            raise _bad(path, what, f"unreadable TorchScript archive ({str(exc).splitlines()[0]})") from None
    return load_torch_file(path, what)


def load_torch_file(path: Path, what: str, mmap: bool = False) -> Any:
    """A ``torch.save`` file through ``torch.load(weights_only=True)`` (tensors, containers, numbers
    and :data:`SAFE_GLOBALS` only), or a one-line ``bad_weights`` error. ``mmap`` maps the tensors
    from the file instead of reading them in (files older than the zip format are read whole)."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            if mmap and zipfile.is_zipfile(path):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).split("\n\n")[0].splitlines()[-1] if "Unsupported global" in str(exc) else str(exc).splitlines()[0]
        raise _bad(path, what, f"refused: it holds Python objects beyond tensors, and ComNeck never unpickles those ({reason})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise _bad(path, what, f"not a safetensors, torch.save or TorchScript file ({str(exc).splitlines()[0]})") from None


def tensors_only(state: Any, path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """``state`` as a flat name -> tensor dict, refusing anything else."""
    if not isinstance(state, dict) or not state:
        raise _bad(Path(path), what, "holds no state dict")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise _bad(Path(path), what, f"entries that are not tensors: {', '.join(map(str, bad[:5]))}")
    return state


def strip_prefix(state: dict[str, torch.Tensor], prefixes: tuple[str, ...] = ("module.",)) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes such as DistributedDataParallel's ``module.`` from every key."""
    out = {}
    for key, value in state.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out
