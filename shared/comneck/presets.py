"""Named model sizes: ``paper`` (the published architecture, CLIP at 224 px), ``paper-336``
(the same networks for LLaVA-1.5's CLIP at 336 px) and ``tiny`` / ``tiny-336`` (same code and
geometry, small widths).

A preset fixes the codec, the neck and the CLIP tower together, because their
widths must agree (the neck reads M latent channels and writes CLIP's width).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from .errors import ComneckInputError, ErrorCode

#: Rate index (1..4) -> lambda of the rate-distortion trade-off the weights were trained at.
#: How a photo becomes the codec's input (comneck.image does them), in wire order: comneck.bitstream
#: numbers them so; append new policies, never reorder. Here, not in comneck.image, so that the
#: command-line parsers name them without importing torch.
RESIZE_POLICIES: tuple[str, ...] = ("paper", "pad-square", "pad-square-white", "none", "stretch")
RATE_LAMBDAS: dict[int, float] = {1: 0.004, 2: 0.008, 3: 0.016, 4: 0.032}

#: The learned codecs (CompressAI's names): the two ELICs, and CompressAI's mean-scale hyperprior
#: (Minnen et al. 2018) as the second codec of the paper's section 4.5 ablation.
ELIC_ARCHS = ("elic2022-chandelier", "elic2022-official")
CODEC_ARCHS = (*ELIC_ARCHS, "mbt2018-mean")

#: How often CLIP's final LayerNorm (``ln_post``) runs before ``proj``: ``once`` as in CLIP itself
#: (OpenAI's and open_clip's code), ``twice`` as in the paper's official code (its ``CLIP_modify``
#: applies ``ln_post`` two times), which trained and evaluated the released necks. Here, not in
#: comneck.clip_split, so that the command-line parsers name them without importing torch.
FINAL_NORMS: tuple[str, ...] = ("once", "twice")


def check_final_norm(value: object, where: str = "clip final norm") -> str:
    """``once`` or ``twice``, or a one-line error naming ``where`` the value came from."""
    if value not in FINAL_NORMS:
        raise ComneckInputError(f"{where}: {value!r} is no CLIP final-norm setting; use once (standard CLIP) or twice "
                                "(the official code's double ln_post)", ErrorCode.BAD_SETTINGS)
    return str(value)


@dataclass(frozen=True)
class CodecConfig:
    """Codec hyper-parameters (CompressAI naming): N main channels, M latent channels, and ELIC's
    channel groups (one group, ``(M,)``, for ``mbt2018-mean``, which codes y in one pass)."""

    arch: str = "elic2022-chandelier"
    N: int = 192
    M: int = 320
    groups: tuple[int, ...] = (16, 16, 32, 64, 192)

    def __post_init__(self) -> None:
        if self.arch not in CODEC_ARCHS:
            raise ComneckInputError(f"unknown codec {self.arch!r}; choose one of {', '.join(CODEC_ARCHS)}")
        if self.arch not in ELIC_ARCHS and self.groups != (self.M,):
            raise ValueError(f"{self.arch} has no channel groups: groups must be ({self.M},)")
        if sum(self.groups) != self.M:
            raise ValueError(f"channel groups {self.groups} must sum to M={self.M}")


@dataclass(frozen=True)
class NeckConfig:
    """Transform-neck sizes: latent channels in, CLIP width out, token grid."""

    latent_channels: int = 320
    width: int = 1024
    heads: int = 16
    grid: int = 16
    layers: int = 1


@dataclass(frozen=True)
class ClipConfig:
    """An open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``)."""

    name: str
    model_cfg: dict[str, Any] = field(hash=False)
    quick_gelu: bool = True  # OpenAI's CLIP weights were trained with QuickGELU
    #: The published CLIP whose geometry a small test tower copies (image size, patch grid), so
    #: backends checked against that CLIP accept tiny checkpoints written for the stand-in.
    stands_for: str | None = None

    @property
    def arch(self) -> str:
        """The open_clip architecture backends compare against: the stand-in's original, or its own name."""
        return self.stands_for or self.name

    def describe(self) -> str:
        stand_in = f" (standing in for {self.stands_for})" if self.stands_for else ""
        return f"{self.name}{stand_in} at {self.image_size} px"

    @property
    def width(self) -> int:
        return int(self.model_cfg["vision_cfg"]["width"])

    @property
    def layers(self) -> int:
        return int(self.model_cfg["vision_cfg"]["layers"])

    @property
    def image_size(self) -> int:
        return int(self.model_cfg["vision_cfg"]["image_size"])

    @property
    def grid(self) -> int:
        return self.image_size // int(self.model_cfg["vision_cfg"]["patch_size"])


@dataclass(frozen=True)
class Preset:
    """Everything needed to build one consistent codec + neck + CLIP stack."""

    name: str
    codec: CodecConfig
    neck: NeckConfig
    clip: ClipConfig
    split_block: int = 2  # the neck feeds CLIP block split_block + 1 (1-based)
    image_size: int = 256  # codec input side (resize + centre crop)
    seed: int = 0  # random initialisation is seeded so edge and cloud build identical weights
    unet_base: int = 64  # post-processing baseline width (64: the paper's 31.04 M U-Net)
    #: CLIP's final LayerNorm ``once`` (standard CLIP) or ``twice`` (the official code): see FINAL_NORMS
    clip_final_norm: str = "once"

    def __post_init__(self) -> None:
        check_final_norm(self.clip_final_norm, f"preset {self.name}")


# ViT-L/14 at 224 px as in open_clip's "ViT-L-14" config; written out so building it
# needs no file lookup and the numbers are visible here.
_VIT_L_14 = {
    "embed_dim": 768,
    "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12},
}

# ViT-L/14 at 336 px as in open_clip's "ViT-L-14-336" config (LLaVA-1.5's CLIP): 24x24 patch
# grid, 577 tokens.
_VIT_L_14_336 = {
    "embed_dim": 768,
    "vision_cfg": {"image_size": 336, "layers": 24, "width": 1024, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12},
}

# Same geometry as ViT-L/14 at 224 px (16x16 patch grid, 257 tokens), small widths.
_TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 4, "width": 64, "head_width": 16, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}

# The tiny widths at 336 px (24x24 patch grid, 577 tokens).
_TINY_CLIP_336 = {**_TINY_CLIP, "vision_cfg": {**_TINY_CLIP["vision_cfg"], "image_size": 336}}

_PAPER = Preset(name="paper", codec=CodecConfig(), neck=NeckConfig(), clip=ClipConfig("ViT-L-14", _VIT_L_14))
_TINY = Preset(
    name="tiny",
    codec=CodecConfig(N=32, M=40, groups=(2, 2, 4, 8, 24)),
    neck=NeckConfig(latent_channels=40, width=64, heads=4, grid=16),
    clip=ClipConfig("tiny-ViT-14", _TINY_CLIP, stands_for="ViT-L-14"),
    unet_base=8,
)

def _with_mbt2018_mean(preset: Preset, name: str, n: int, m: int) -> Preset:
    """``preset`` with CompressAI's mbt2018-mean (N=n, M=m) in place of ELIC: the section 4.5 ablation
    of the codec. Its neck reads m channels; everything else is the preset's."""
    return replace(preset, name=name, codec=CodecConfig(arch="mbt2018-mean", N=n, M=m, groups=(m,)),
                   neck=replace(preset.neck, latent_channels=m))


PRESETS: dict[str, Preset] = {
    "paper": _PAPER,
    "tiny": _TINY,
    # LLaVA-1.5's geometry: codec input 384 -> 24x24 latents -> 577 neck tokens -> CLIP at 336 px.
    # The codec is paper's (same config and seed): it works at any size, and so do its weights.
    "paper-336": replace(_PAPER, name="paper-336", neck=replace(_PAPER.neck, grid=24),
                         clip=ClipConfig("ViT-L-14-336", _VIT_L_14_336), image_size=384),
    "tiny-336": replace(_TINY, name="tiny-336", neck=replace(_TINY.neck, grid=24),
                        clip=ClipConfig("tiny-ViT-14-336", _TINY_CLIP_336, stands_for="ViT-L-14-336"), image_size=384),
    # CompressAI's zoo publishes mbt2018-mean at qualities 1-5 with N=128, M=192 (6-8: N=192, M=320).
    "paper-mbt2018-mean": _with_mbt2018_mean(_PAPER, "paper-mbt2018-mean", 128, 192),
    "tiny-mbt2018-mean": _with_mbt2018_mean(_TINY, "tiny-mbt2018-mean", 32, 40),
}


def shares_tail(a: Preset, b: Preset) -> bool:
    """Whether necks of ``a`` and of ``b`` feed one CLIP: the same CLIP and codec input size (the
    codec, and so the neck's input width, may differ)."""
    return a.clip == b.clip and a.image_size == b.image_size and replace(a.neck, latent_channels=0) == replace(b.neck, latent_channels=0)


def get_preset(name: str) -> Preset:
    """Return the preset called ``name`` or raise a one-line error listing the choices."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ComneckInputError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def check_rate(rate: int) -> int:
    """Validate a rate index (1..4, lambda 0.004..0.032)."""
    if rate not in RATE_LAMBDAS:
        raise ComneckInputError(f"rate index must be one of 1..4 (lambda 0.004..0.032), got {rate!r}")
    return rate
