"""``comneck convert``: any supported weight file -> a folder in our own layout.

The folder holds one safetensors file per network found in the source (``codec``, ``neck``,
``clip``) and ``comneck.json``: preset, codec architecture, scenario, rate index and lambda,
the source's name and SHA-256, and the codec fingerprint its bitstreams will carry. Every network is
loaded into the preset's model before it is written, so a folder that exists also loads.
The folder appears whole or not at all (written beside it, then renamed).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..checkpoints import save_state_dict
from ..errors import ComneckInputError
from ..models import build_codec, seeded
from ..presets import Preset
from .elic import is_compressai_elic, is_elic_llm
from .fitting import fit
from .reading import read_weights, strip_prefix
from .sources import MANIFEST, check_labels, codec_from, neck_from

FORMAT = "comneck-weights"


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
    if is_elic_llm(keys) or is_compressai_elic(keys):
        return ["codec"]
    if "trans_latent_dim.weight" in keys:
        return ["neck"]
    return ["clip"]  # or nothing known: the CLIP importer's refusal names what the file holds


def convert(source: str | Path, output: str | Path, preset: Preset, scenario: str | None = None, rate: int | None = None,
            force: bool = False) -> dict[str, Any]:
    """Convert ``source`` into the folder ``output``; returns the manifest written there."""
    from ..clip_split import build_clip
    from ..neck import TransformNeck
    from .clip import clip_from_object, load_clip, part_of

    source, output = Path(source), Path(output)
    check_labels(scenario, rate)
    if output.exists() and any(output.iterdir()) and not force:
        raise ComneckInputError(f"{output} exists and is not empty; choose another folder or pass --force", "bad_output")
    obj = read_weights(source, "source")
    parts = _parts(obj)
    manifest: dict[str, Any] = {"format": FORMAT, "version": 1, "preset": preset.name, "parts": parts,
                                "source": source.name, "source_sha256": _sha256(source)}
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        if "codec" in parts:
            codec_source = codec_from(obj, source, scenario, rate)
            codec = build_codec(preset, codec_source)
            save_state_dict(codec.model, staging / "codec.safetensors")
            info = codec_source.info
            manifest.update(layout=info.layout, codec_arch=codec.config.arch, scenario=info.scenario, rate=info.rate,
                            lmbda=info.lmbda, codec_fingerprint=codec.fingerprint().hex())
        if "neck" in parts:
            neck = seeded(preset.seed + 1, TransformNeck, preset.neck)
            fit(neck, neck_from(obj, source)[0], "neck")
            save_state_dict(neck, staging / "neck.safetensors")
        if "clip" in parts:
            imported = clip_from_object(obj, source)
            clip = seeded(preset.seed + 2, build_clip, preset.clip)
            load_clip(clip, imported)
            missing = set(imported.missing_parts)  # written without them, so loading the folder knows they are absent
            save_state_dict(clip, staging / "clip.safetensors", keep=lambda key: part_of(key) not in missing)
            manifest.update(layout=imported.layout, clip_missing_parts=list(imported.missing_parts))
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return manifest
