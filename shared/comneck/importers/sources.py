"""Which file holds which network, in which layout, and what its name says about it.

A weight source is any of:

* a weights folder (:mod:`comneck.weights_folder`) written by ``comneck convert`` or a training
  export (``codec.safetensors``, ``neck.safetensors``, ``clip.safetensors``, ``comneck.json``);
* one of our safetensors files (CompressAI / open_clip / neck key names);
* a release checkpoint ``d{1,2,3}_{1..4}.pth.tar`` of the paper (``state_dict``: the codec in
  the ELIC_LLM layout, ``adapter``: the neck);
* a base ELIC checkpoint (ELiC-ReImplemetation, flat or under ``state_dict``) or a CompressAI
  ``Elic2022Chandelier`` / ``Elic2022Official`` state dict;
* a CompressAI zoo ``mbt2018-mean`` checkpoint (``MeanScaleHyperprior``), the second codec.

CLIP files are handled by :mod:`comneck.importers.clip`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ComneckInputError, ErrorCode
from ..presets import CODEC_ARCHS, check_rate
from ..provenance import WeightsInfo
from ..weights_folder import part_file, read_manifest
from .compressai_zoo import from_zoo_mean_scale_hyperprior, is_zoo_mean_scale_hyperprior
from .elic import check_not_pre_127_official, from_elic_llm, is_compressai_latent_form, is_elic_llm
from .reading import read_weights, strip_prefix, tensors_only

SCENARIOS = ("d1", "d2", "d3")
_RELEASE_NAME = re.compile(r"(?<![A-Za-z0-9])(d[123])_([1-4])(?![0-9])")


@dataclass(frozen=True)
class CodecSource:
    """A codec state dict in CompressAI key names and the architectures that may hold it, best first."""

    state: dict[str, torch.Tensor]
    archs: tuple[str, ...]
    info: WeightsInfo


def release_name(path: str | Path) -> tuple[str | None, int | None]:
    """(scenario, rate index) from a release file name such as ``d2_3.pth.tar``; Nones otherwise."""
    match = _RELEASE_NAME.search(Path(path).name)
    return (match[1], int(match[2])) if match else (None, None)


def check_labels(scenario: str | None, rate: int | None) -> None:
    """Validate a scenario and rate index given by hand (None: not given)."""
    if scenario is not None and scenario not in SCENARIOS:
        raise ComneckInputError(f"scenario must be one of {', '.join(SCENARIOS)}, got {scenario!r}", ErrorCode.BAD_WEIGHTS)
    if rate is not None:
        check_rate(rate)


def _unwrap(obj: Any, path: Path, what: str) -> tuple[dict[str, torch.Tensor], Any]:
    """(state dict, the release dict or None): release and training files nest the state dict."""
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        return strip_prefix(tensors_only(obj["state_dict"], path, what), ("module.", "base_coder.")), obj
    return strip_prefix(tensors_only(obj, path, what), ("module.", "base_coder.")), None


def read_codec(path: str | Path, scenario: str | None = None, rate: int | None = None) -> CodecSource:
    """Codec weights from any source above; ``scenario``/``rate`` override what the name says."""
    path = Path(path)
    check_labels(scenario, rate)
    if path.is_dir():
        meta = read_manifest(path)
        inner = read_codec(part_file(path, "codec"))
        info = WeightsInfo("comneck", str(path), scenario or meta.get("scenario"), rate or meta.get("rate"))
        arch = meta.get("codec_arch")
        return CodecSource(inner.state, (arch,) if arch else inner.archs, info)
    return codec_from(read_weights(path, "codec"), path, scenario, rate)


def codec_from(obj: Any, path: Path, scenario: str | None = None, rate: int | None = None) -> CodecSource:
    """:func:`read_codec` on an object already read from ``path``."""
    state, release = _unwrap(obj, path, "codec")
    named_scenario, named_rate = release_name(path)
    if is_elic_llm(state):
        layout = "release" if release is not None and "adapter" in release else "elic-llm"
        mapped, archs = from_elic_llm(state), ("elic2022-chandelier",)
    elif is_compressai_latent_form(state):
        check_not_pre_127_official(state)
        # our own files hold any registry codec; CompressAI's ELIC files do not say which ELIC
        layout, mapped, archs = "compressai", state, CODEC_ARCHS
    elif is_zoo_mean_scale_hyperprior(state):
        layout, mapped, archs = "compressai-zoo", from_zoo_mean_scale_hyperprior(state), ("mbt2018-mean",)
    else:
        raise ComneckInputError(
            f"codec weights: {path.name} holds neither an ELIC_LLM (ComNeck release, ELiC-ReImplemetation) nor a "
            f"CompressAI ELIC or mbt2018-mean state dict (first keys: {', '.join(list(state)[:3])})",
            ErrorCode.BAD_WEIGHTS,
        )
    info = WeightsInfo(layout, str(path), scenario or named_scenario, rate or named_rate)
    return CodecSource(mapped, archs, info)


def read_neck(path: str | Path) -> tuple[dict[str, torch.Tensor], WeightsInfo]:
    """Neck weights from a weights folder, our safetensors, or a release checkpoint's ``adapter``
    (the official ``Linear_Encoder`` uses our key names)."""
    path = Path(path)
    if path.is_dir():
        state, _ = read_neck(part_file(path, "neck"))
        return state, WeightsInfo("comneck", str(path))
    return neck_from(read_weights(path, "neck"), path)


def neck_from(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], WeightsInfo]:
    """:func:`read_neck` on an object already read from ``path``."""
    scenario, rate = release_name(path)
    if isinstance(obj, dict) and "adapter" in obj:
        return strip_prefix(tensors_only(obj["adapter"], path, "neck")), WeightsInfo("release", str(path), scenario, rate)
    if isinstance(obj, dict) and "state_dict" in obj:
        raise ComneckInputError(f"neck weights: {path.name} has a state_dict but no 'adapter' entry: a codec-only checkpoint", ErrorCode.BAD_WEIGHTS)
    return strip_prefix(tensors_only(obj, path, "neck")), WeightsInfo("comneck", str(path), scenario, rate)
