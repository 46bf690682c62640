"""Parameters and multiply-accumulates (MACs) per pixel of every network on the data path.

Counter: PyTorch's own ``torch.utils.flop_counter.FlopCounterMode`` (MACs = FLOPs / 2).
It counts matrix products and convolutions from the shapes of the aten ops that
really run, so attention projections, the attention matmuls and transposed
convolutions are counted in full; element-wise work (norms, activations,
softmax, additions) is not. ``nn.MultiheadAttention``'s inference fast path runs
one fused op the counter has no formula for, so it is switched off while counting.
Below it, torch picks an attention kernel by device and input: on real CPU tensors
torch 2.13/2.14 run ``_scaled_dot_product_flash_attention_for_cpu``, which their
counter only learns in 2.15, so that op gets the counter's own SDPA formula here
(the math path on meta tensors decomposes into counted matmuls; CUDA kernels are known).
Pure-torch modules are run on shape-only "meta" tensors; the codec's entropy
models need real values, so the codec parts run on real CPU tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from tqdm import tqdm

from .clip_split import ClipSplit, build_clip
from .codec import LATENT_STRIDE, LearnedCodec
from .errors import ComneckInputError
from .image import CODEC_STRIDE
from .neck import TransformNeck
from .pipeline import latent_features
from .presets import ELIC_ARCHS, Preset
from .unet import UNet

#: Paper Table 3 (params in millions, kMAC per pixel at 256x256).
PAPER_TABLE3: dict[str, tuple[float, float]] = {
    "neck": (13.19, 52.795),
    "g_s": (7.34, 112.00),
    "unet": (31.04, 835.72),
    "clip_head": (25.78, 70.24),
}

#: What each component's numbers include.
COMPONENT_SCOPE: dict[str, str] = {
    "neck": "transform-neck: linear {M}->{width}, class/pos embeddings, ln_pre, {neck_layers} attention block(s)",
    "g_a": "{codec} analysis transform",
    "h_a": "{codec} hyper-analysis",
    "h_s_ctx": "{entropy_parameters}",
    "g_s": "{codec} synthesis transform (the decoder, for human viewing)",
    "unet": "post-processing U-Net on x_hat (baseline)",
    "clip_embed": "CLIP class + positional embeddings and ln_pre (adds only, no MACs)",
    "clip_head": "CLIP patch-embedding conv (the stem) + blocks 1..k, what the neck replaces",
    "clip_tail": "CLIP blocks k+1..{layers} + ln_post + proj, run on the neck's tokens",
    "cloud": "the served cloud path after entropy decoding: neck + CLIP tail (comneck.pipeline.latent_features)",
}


@dataclass(frozen=True)
class Cost:
    """Size and compute of one component."""

    params: int
    macs: int
    pixels: int

    @property
    def kmac_per_pixel(self) -> float:
        return self.macs / self.pixels / 1e3


def _cpu_flash_attention_flops(query_shape: torch.Size, key_shape: torch.Size, value_shape: torch.Size, *args: object,
                               **kwargs: object) -> int:
    """FLOPs of the fused CPU attention kernel: QK^T and AV, as for every other SDPA kernel."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


#: Attention kernels the counter of some supported torch releases has no formula for.
_ATTENTION_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops}


def count_macs(fn: Callable[[], object]) -> int:
    """MACs of everything ``fn`` runs (see the module docstring for what counts)."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_ATTENTION_FORMULAS) as counter:
            fn()
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return counter.get_total_flops() // 2


def count_params(*modules: nn.Module | nn.Parameter | torch.Tensor) -> int:
    """Number of parameters of modules and loose parameter tensors together."""
    total = 0
    for m in modules:
        total += sum(p.numel() for p in m.parameters()) if isinstance(m, nn.Module) else m.numel()
    return total


def complexity_report(preset: Preset, size: int | None = None, split_block: int | None = None) -> dict[str, Cost]:
    """Cost of each component for a ``size`` x ``size`` codec input (default: the preset's;
    random weights suffice). The neck and the CLIP tail run on the tokens of that input's grid."""
    size = preset.image_size if size is None else size
    if size <= 0 or size % CODEC_STRIDE:
        raise ComneckInputError(f"--size must be a positive multiple of {CODEC_STRIDE}, got {size}")
    k = preset.split_block if split_block is None else split_block
    pixels = size * size
    grid = size // LATENT_STRIDE
    report: dict[str, Cost] = {}
    steps = tqdm(total=4, desc="counting", unit="part", leave=False)

    codec = LearnedCodec(preset.codec).eval()
    elic, lc = codec.model, codec.model.latent_codec
    hyper = lc["hyper"]
    x = torch.rand(1, 3, size, size)
    with torch.no_grad():
        y = elic.g_a(x)
        z = hyper.h_a(y)
        side = hyper.h_s(torch.round(z))
    report["g_a"] = Cost(count_params(elic.g_a), count_macs(lambda: elic.g_a(x)), pixels)
    report["h_a"] = Cost(count_params(hyper.h_a), count_macs(lambda: hyper.h_a(y)), pixels)
    report["h_s_ctx"] = Cost(
        count_params(hyper.h_s, lc["y"]),
        count_macs(lambda: (hyper.h_s(torch.round(z)), lc["y"](y, side))),
        pixels,
    )
    report["g_s"] = Cost(count_params(elic.g_s), count_macs(lambda: elic.g_s(y)), pixels)
    steps.update()

    with torch.device("meta"):
        neck = TransformNeck(replace(preset.neck, grid=grid))
        unet = UNet(base=preset.unet_base)
    y_meta = torch.empty(1, preset.codec.M, grid, grid, device="meta")
    report["neck"] = Cost(count_params(neck), count_macs(lambda: neck(y_meta)), pixels)
    steps.update()
    x_meta = torch.empty(1, 3, size, size, device="meta")
    report["unet"] = Cost(count_params(unet), count_macs(lambda: unet(x_meta)), pixels)
    steps.update()

    with torch.device("meta"):
        visual = build_clip(preset.clip).visual
    split = ClipSplit(visual, k)
    blocks = visual.transformer.resblocks
    clip_px = preset.clip.image_size
    images = torch.empty(1, 3, clip_px, clip_px, device="meta")
    tokens = torch.empty(1, grid**2 + 1, preset.clip.width, device="meta")
    report["clip_embed"] = Cost(count_params(visual.class_embedding, visual.positional_embedding, visual.ln_pre), 0, pixels)
    report["clip_head"] = Cost(count_params(visual.conv1, *blocks[:k]), count_macs(lambda: split.head(images)), pixels)
    tail_params = count_params(*blocks[k:], visual.ln_post) + (visual.proj.numel() if visual.proj is not None else 0)
    report["clip_tail"] = Cost(tail_params, count_macs(lambda: split.tail(tokens)), pixels)
    report["cloud"] = Cost(report["neck"].params + tail_params, count_macs(lambda: latent_features(neck, split, y_meta)), pixels)
    steps.update()
    steps.close()
    return report


def format_report(report: dict[str, Cost], preset: Preset, size: int, split_block: int) -> str:
    """A fixed-width table; the paper's Table 3 figures stand beside ours only where they measure
    the same thing (the paper preset at 256 x 256, split k=2), never beside a smaller model's."""
    comparable = (preset.name, size, split_block) == ("paper", 256, 2)  # the setting of Table 3
    elic = preset.codec.arch in ELIC_ARCHS
    sizes = {"M": preset.neck.latent_channels, "width": preset.neck.width, "neck_layers": preset.neck.layers, "layers": preset.clip.layers,
             "codec": "ELIC" if elic else preset.codec.arch,
             "entropy_parameters": "hyper-synthesis + channel/spatial context + parameter aggregation (both checkerboard passes)" if elic
             else "hyper-synthesis (means and scales)"}
    head = f"{'component':<11} {'params':>12} {'paper':>7} {'kMAC/px':>9} {'paper':>8}  includes" if comparable else \
        f"{'component':<11} {'params':>12} {'kMAC/px':>9}  includes"
    lines = [
        f"Complexity of preset {preset.name} at {size}x{size}, split k={split_block} (kMAC per pixel of the codec input;"
        " the CLIP head runs at CLIP's own input size)",
        head,
    ]
    for name, cost in report.items():
        scope = COMPONENT_SCOPE[name].format(**sizes)
        if comparable:
            paper = PAPER_TABLE3.get(name)
            paper_params, paper_kmac = (f"{paper[0]:.2f}M", f"{paper[1]:.2f}") if paper else ("", "")
            lines.append(f"{name:<11} {cost.params:>12,} {paper_params:>7} {cost.kmac_per_pixel:>9.2f} {paper_kmac:>8}  {scope}")
        else:
            lines.append(f"{name:<11} {cost.params:>12,} {cost.kmac_per_pixel:>9.2f}  {scope}")
    if not comparable:
        lines.append("(the paper's Table 3 figures are for preset paper at 256x256, split k=2: `comneck complexity --preset paper`)")
    return "\n".join(lines)


def report_json(report: dict[str, Cost]) -> dict[str, dict[str, float | int]]:
    """``{component: {"params": int, "kmac_per_pixel": float}}``."""
    return {name: {"params": c.params, "kmac_per_pixel": round(c.kmac_per_pixel, 4)} for name, c in report.items()}
