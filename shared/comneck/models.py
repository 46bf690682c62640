"""Build a preset's networks: seeded random weights, or weight files where given.

Random weights are seeded, so the edge device and the gateway, building the same
preset separately, get identical codecs and real bitstreams decode. Every consumer can
ask which parts are random (:attr:`ComneckModels.random_parts`) and must say so.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .codec import LearnedCodec
from .errors import ComneckInputError, ErrorCode
from .importers.elic import is_derived
from .importers.fitting import fit, key_problems
from .importers.reading import read_weights
from .importers.sources import CodecSource, codec_from, neck_from, read_codec, read_neck
from .presets import ELIC_ARCHS, PRESETS, Preset, check_final_norm, check_rate
from .provenance import RANDOM_WEIGHTS_NOTE
from .weights_folder import MANIFEST, read_manifest



def random_weights_note(parts: tuple[str, ...]) -> str:
    """The warning every output carries while ``parts`` (codec, neck, clip) hold random weights."""
    if not parts:
        return "trained weights loaded for codec, neck and CLIP"
    return RANDOM_WEIGHTS_NOTE.replace("no checkpoint loaded", f"no checkpoint loaded for {', '.join(parts)}")


def seeded(seed: int, build: type[nn.Module], *args: object) -> nn.Module:
    """Construct ``build(*args)`` under a private RNG seeded with ``seed``, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build(*args).eval()


def fitted_codec(preset: Preset, source: CodecSource) -> LearnedCodec:
    """The preset's codec holding ``source``, in the first architecture of the preset's family
    (ELIC, or mbt2018-mean) that it fits (CompressAI files do not say which ELIC they are);
    masks and tables are left to the caller."""
    family = ELIC_ARCHS if preset.codec.arch in ELIC_ARCHS else (preset.codec.arch,)
    archs = [arch for arch in source.archs if arch in family]
    if not archs:
        others = ", ".join(name for name, p in PRESETS.items() if p.codec.arch in source.archs)
        raise ComneckInputError(f"codec weights are {'/'.join(source.archs)}, preset {preset.name!r} runs {preset.codec.arch}; "
                                f"use a preset for those weights ({others})", ErrorCode.BAD_WEIGHTS)
    first: list[str] = []
    for arch in archs:
        codec = seeded(preset.seed, LearnedCodec, replace(preset.codec, arch=arch))
        problems = key_problems(codec.model.state_dict(), source.state, is_derived)
        if not problems:
            fit(codec.model, source.state, "codec", is_derived)
            codec.weights_info = source.info
            return codec
        first = first or problems
    raise ComneckInputError(f"codec weights do not fit preset {preset.name!r} ({'/'.join(archs)}): {'; '.join(first)}", ErrorCode.BAD_WEIGHTS)


def build_codec(preset: Preset, weights: str | Path | CodecSource | None = None, scenario: str | None = None,
                rate: int | None = None) -> LearnedCodec:
    """The preset's ELIC, seeded or from any weight source :mod:`comneck.importers.sources` reads
    (or one already read), with the checkerboard masks applied and the entropy tables rebuilt
    from the weights. ``codec.weights_info`` says where the weights came from (None: seeded)."""
    if weights is None:
        codec = seeded(preset.seed, LearnedCodec, preset.codec)
    else:
        source = weights if isinstance(weights, CodecSource) else read_codec(weights, scenario, rate)
        codec = fitted_codec(preset, source)
    codec.apply_context_masks()
    codec.update_entropy_tables()
    return codec


def codec_rate(codec: LearnedCodec, rate: int | None = None) -> int:
    """The rate index a container of ``codec`` names: ``rate``, else the one its weights were
    trained for, else 1; a ``rate`` that contradicts the weights is refused, since the container
    would misreport it."""
    trained = codec.trained_rate
    if rate is not None and trained is not None and check_rate(rate) != trained:
        raise ComneckInputError(f"rate {rate} given, but the codec weights ({Path(codec.weights_info.source).name}) are rate {trained}")
    return check_rate(rate if rate is not None else trained or 1)


@dataclass(frozen=True)
class WeightFiles:
    """Optional weight sources per network (any form :mod:`comneck.importers` reads); None
    means seeded random."""

    codec: Path | None = None
    neck: Path | None = None
    clip: Path | None = None

    @classmethod
    def bundle(cls, source: Path | None, codec: Path | None = None, neck: Path | None = None, clip: Path | None = None) -> "WeightFiles":
        """Fill the networks not given one by one from ``source``: a weights folder of ``comneck
        convert`` or a training export (each network it holds) or a release checkpoint (codec and neck)."""
        if source is None:
            return cls(codec, neck, clip)
        source = Path(source)
        if source.is_dir():
            parts = read_manifest(source).get("parts", [])
            own = {part: source if part in parts else None for part in ("codec", "neck", "clip")}
        else:
            own = {"codec": source, "neck": source, "clip": None}
        return cls(codec or own["codec"], neck or own["neck"], clip or own["clip"])


@dataclass(frozen=True)
class NeckRecord:
    """What a neck's source says of the CLIP it was trained against: how often ``ln_post`` ran
    (``final_norm``) and how many blocks its tokens skip (``split_block``); None: it says nothing."""

    final_norm: str | None = None
    split_block: int | None = None


#: A neck file outside a weights folder (the release checkpoint's ``adapter``, the official layout)
#: was trained through the official code's CLIP: ``ln_post`` twice, its tokens entering block 3.
OFFICIAL_NECK = NeckRecord("twice", 2)


def neck_record(neck: Path | None) -> NeckRecord:
    """What the neck's weights record: a weights folder's ``clip_final_norm`` and ``split_block``
    (each None when absent), :data:`OFFICIAL_NECK` for a neck file, nothing for no neck weights."""
    if neck is None:
        return NeckRecord()
    folder = Path(neck)
    if not folder.is_dir():
        return OFFICIAL_NECK
    manifest = read_manifest(folder)
    final_norm, split_block = manifest.get("clip_final_norm"), manifest.get("split_block")
    if final_norm is not None:
        check_final_norm(final_norm, f"{folder / MANIFEST} clip_final_norm")
    if split_block is not None and (not isinstance(split_block, int) or isinstance(split_block, bool) or split_block < 0):
        raise ComneckInputError(f"{folder / MANIFEST} split_block: {split_block!r} is no number of CLIP blocks", ErrorCode.BAD_WEIGHTS)
    return NeckRecord(final_norm, split_block)


@dataclass
class ComneckModels:
    """The cloud side's networks for one preset."""

    preset: Preset
    codec: LearnedCodec
    neck: nn.Module
    clip_model: nn.Module  # the whole open_clip CLIP: backends may use its text tower
    clip: nn.Module  # ClipSplit over clip_model.visual
    random_parts: tuple[str, ...] = ("codec", "neck", "clip")
    #: the CLIP final norm the neck's weights record (None: they record none)
    recorded_final_norm: str | None = None

    def __post_init__(self) -> None:
        self.codec_fingerprint = self.codec.fingerprint()

    @property
    def clip_final_norm(self) -> str:
        """How often the CLIP split runs ``ln_post``: ``once`` or ``twice``."""
        return self.clip.final_norm

    @property
    def final_norm_overridden(self) -> bool:
        """The operator chose a CLIP final norm other than the one the neck's weights record."""
        return self.recorded_final_norm not in (None, self.clip_final_norm)

    @property
    def random_weights(self) -> bool:
        return bool(self.random_parts)

    @property
    def note(self) -> str:
        return random_weights_note(self.random_parts)

    def to(self, device: str | torch.device, dtype: torch.dtype = torch.float32) -> "ComneckModels":
        """Move the neck and CLIP; the codec stays on the CPU in float32, where the edge coded,
        because entropy decoding must repeat the encoder's arithmetic exactly."""
        self.neck.to(device=device, dtype=dtype)
        self.clip_model.to(device=device, dtype=dtype)
        return self


def build_cloud_models(preset: Preset, weights: WeightFiles = WeightFiles(), clip_final_norm: str | None = None,
                       split_block: int | None = None, beside: ComneckModels | None = None) -> ComneckModels:
    """Codec, neck and CLIP split of a preset, from weight files where given. The CLIP split's final
    norm is ``clip_final_norm`` when given (the operator's word), else what the neck's weights record
    (:func:`neck_record`), else the preset's; the blocks the neck skips likewise (``split_block``,
    the record, the preset's 2): the models' preset says which. ``beside``: another rate point's
    models, whose CLIP (and what of it is random) these share instead of building their own
    (``weights.clip`` is then ignored)."""
    record = neck_record(weights.neck)
    skipped = split_block if split_block is not None else record.split_block
    if skipped is not None and skipped != preset.split_block:
        preset = replace(preset, split_block=skipped)
    from .clip_split import ClipSplit, build_clip
    from .neck import TransformNeck

    neck = seeded(preset.seed + 1, TransformNeck, preset.neck)
    random_parts = [part for part in ("codec", "neck") if getattr(weights, part) is None]
    if beside is not None:
        clip = beside.clip_model
        random_parts += [part for part in beside.random_parts if part.startswith("clip")]
        weights = replace(weights, clip=None)
    else:
        clip = seeded(preset.seed + 2, build_clip, preset.clip)
        random_parts += ["clip"] if weights.clip is None else []
    codec_weights: Path | CodecSource | None = weights.codec
    if weights.neck is not None and weights.neck == weights.codec and Path(weights.neck).is_file():
        release = read_weights(weights.neck, "release")  # one file holds both: read it once
        fit(neck, neck_from(release, Path(weights.neck))[0], "neck")
        codec_weights = codec_from(release, Path(weights.codec))
    elif weights.neck is not None:
        fit(neck, read_neck(weights.neck)[0], "neck")
    if weights.clip is not None:
        from .importers.clip import load_clip, read_clip

        imported = read_clip(weights.clip)
        load_clip(clip, imported)
        random_parts += [f"clip {part}" for part in imported.missing_parts]
    final_norm = (check_final_norm(clip_final_norm, "clip_final_norm") if clip_final_norm is not None
                  else record.final_norm or preset.clip_final_norm)
    split = ClipSplit(clip.visual, preset.split_block, final_norm).eval()
    return ComneckModels(preset, build_codec(preset, codec_weights), neck, clip, split, tuple(random_parts), record.final_norm)
