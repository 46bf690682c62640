"""``comneck convert``: any supported weight file -> a weights folder (:mod:`comneck.weights_folder`).

The folder holds one safetensors file per network found in the source (``codec``, ``neck``,
``clip``) and ``comneck.json``: preset, codec architecture, scenario, rate index and lambda,
the source's name and SHA-256, the codec fingerprint its bitstreams will carry and, with a neck,
``clip_final_norm: twice`` (the official code's CLIP, which the neck was trained against). Every network is
loaded into the preset's model before it is written, so a folder that exists also loads.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .importers.compressai_zoo import is_zoo_mean_scale_hyperprior
from .importers.elic import is_compressai_latent_form, is_elic_llm
from .importers.fitting import fit
from .importers.reading import read_weights, strip_prefix
from .importers.sources import check_labels, codec_from, neck_from
from .models import build_codec, seeded
from .presets import Preset
from .weights_folder import check_target, write_folder


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _parts(obj: Any) -> list[str]:
    """Which networks a loaded file holds, from its keys."""
    if isinstance(obj, dict) and "adapter" in obj and "state_dict" in obj:
        return ["codec", "neck"]
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else {}
    keys = strip_prefix(state) if isinstance(state, dict) else {}
    if is_elic_llm(keys) or is_compressai_latent_form(keys) or is_zoo_mean_scale_hyperprior(keys):
        return ["codec"]
    if "trans_latent_dim.weight" in keys:
        return ["neck"]
    return ["clip"]  # or nothing known: the CLIP importer's refusal names what the file holds


def convert(source: str | Path, output: str | Path, preset: Preset, scenario: str | None = None, rate: int | None = None,
            force: bool = False) -> dict[str, Any]:
    """Convert ``source`` into the folder ``output``; returns the manifest written there."""
    from .clip_split import build_clip
    from .importers.clip import clip_from_object, load_clip, part_of
    from .neck import TransformNeck

    source, output = Path(source), Path(output)
    check_labels(scenario, rate)
    check_target(output, force)  # before the slow part
    obj = read_weights(source, "source")
    found = _parts(obj)
    parts: dict[str, nn.Module | dict[str, torch.Tensor]] = {}
    details: dict[str, Any] = {"source": source.name, "source_sha256": _sha256(source)}
    if "codec" in found:
        codec_source = codec_from(obj, source, scenario, rate)
        codec = build_codec(preset, codec_source)
        parts["codec"] = codec.model
        info = codec_source.info
        details.update(layout=info.layout, codec_arch=codec.config.arch, scenario=info.scenario, rate=info.rate,
                       lmbda=info.lmbda, codec_fingerprint=codec.fingerprint().hex())
    if "neck" in found:
        neck = seeded(preset.seed + 1, TransformNeck, preset.neck)
        fit(neck, neck_from(obj, source)[0], "neck")
        parts["neck"] = neck
        # A neck in the official layout was trained through the official code's CLIP, which applies
        # ln_post twice; a gateway serving the folder does the same unless its operator overrides it.
        details["clip_final_norm"] = "twice"
        details["split_block"] = 2  # the official code's start_layer: the neck's tokens enter block 3
    if "clip" in found:
        imported = clip_from_object(obj, source)
        clip = seeded(preset.seed + 2, build_clip, preset.clip)
        load_clip(clip, imported)
        missing = set(imported.missing_parts)  # written without them, so loading the folder knows they are absent
        parts["clip"] = {key: value for key, value in clip.state_dict().items() if part_of(key) not in missing}
        details.update(layout=imported.layout, clip_missing_parts=list(imported.missing_parts))
    return write_folder(output, preset.name, parts, details, force)
