"""ELIC weights from the layouts they are published in, onto CompressAI's key names (ours).

* ``elic-llm``: the official ComNeck code's ``ELIC_LLM`` and VincentChandelier/ELiC-ReImplemetation's
  ``TestModel`` (one layout): ``g_a``, ``g_s``, ``h_a``, ``h_s``, ``cc_transforms.{i}``,
  ``context_prediction.{k}``, ``ParamAggregation.{k}``, ``entropy_bottleneck``, one shared
  ``gaussian_conditional``. Same architecture as CompressAI's ``Elic2022Chandelier``: the tensors
  map one to one, no reordering (both feed the parameter aggregation [spatial context,
  channel context, hyper params] and split its output into means then scales).
* ``compressai``: ``Elic2022Chandelier`` / ``Elic2022Official`` state dicts (``latent_codec.*``),
  ComNeck's own files included.

Entropy-coding tables (CDFs, offsets, scale tables, bounds) and the checkerboard masks are
rebuilt from the architecture and the weights, never copied: they are derived data, and
rebuilding them makes every importer produce the same tables as training would.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from ..errors import ComneckInputError, ErrorCode
from .fitting import listing

_Y = "latent_codec.y"
_HYPER = "latent_codec.hyper"

#: ELIC_LLM key pattern -> CompressAI key. Written by hand from the two module definitions:
#: CompressAI ships no converter for this layout.
ELIC_LLM_RULES: list[tuple[str, Callable[[re.Match[str]], str]]] = [
    (r"g_a\.(.+)", lambda m: f"g_a.{m[1]}"),
    (r"g_s\.(.+)", lambda m: f"g_s.{m[1]}"),
    (r"h_a\.(.+)", lambda m: f"{_HYPER}.h_a.{m[1]}"),
    (r"h_s\.(.+)", lambda m: f"{_HYPER}.h_s.{m[1]}"),
    # cc_transforms[i] predicts group i + 1 (group 0 has no channel context)
    (r"cc_transforms\.(\d+)\.(.+)", lambda m: f"{_Y}.channel_context.y{int(m[1]) + 1}.{m[2]}"),
    (r"context_prediction\.(\d+)\.(weight|bias|mask)", lambda m: f"{_Y}.latent_codec.y{m[1]}.context_prediction.{m[2]}"),
    (r"ParamAggregation\.(\d+)\.(.+)", lambda m: f"{_Y}.latent_codec.y{m[1]}.entropy_parameters.{m[2]}"),
    # CompressAI <= 1.2.0 named the entropy bottleneck's parameters _matrix0, _bias0, _factor0.
    (r"entropy_bottleneck\._(matrix|bias|factor)(\d+)", lambda m: f"{_HYPER}.entropy_bottleneck.{_PLURAL[m[1]]}.{m[2]}"),
    (r"entropy_bottleneck\.(.+)", lambda m: f"{_HYPER}.entropy_bottleneck.{m[1]}"),
]
_PLURAL = {"matrix": "matrices", "bias": "biases", "factor": "factors"}

_DERIVED = ("_offset", "_quantized_cdf", "_cdf_length", "scale_table", "scale_bound", ".bound", "entropy_bottleneck.target", ".mask")


def is_derived(key: str) -> bool:
    """Keys rebuilt from the architecture and weights (entropy tables, bounds, masks)."""
    return key.endswith(_DERIVED)


def is_elic_llm(state: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(("ParamAggregation.", "cc_transforms.")) for k in state)


def is_compressai_latent_form(state: dict[str, torch.Tensor]) -> bool:
    """CompressAI's latent-codec key names (``g_a``, ``latent_codec.*``): its ELICs, or our own
    files of any registry codec."""
    return any(k.startswith(_Y + ".") for k in state) and "g_a.0.weight" in state


def _rename(key: str) -> str | None:
    for pattern, rename in ELIC_LLM_RULES:
        match = re.fullmatch(pattern, key)
        if match:
            return rename(match)
    return None


def from_elic_llm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ELIC_LLM / ELiC-ReImplemetation keys -> CompressAI ``Elic2022Chandelier`` keys.

    The shared ``gaussian_conditional`` holds only derived tables (CompressAI keeps one per
    group), so it is dropped; any key no rule knows is refused, all of them listed.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key.startswith("gaussian_conditional.") and is_derived(key):
            continue
        new = _rename(key)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise ComneckInputError(f"codec weights (ELIC_LLM layout): keys no mapping knows ({len(unknown)}): {listing(unknown)}", ErrorCode.BAD_WEIGHTS)
    return out


def check_not_pre_127_official(state: dict[str, torch.Tensor]) -> None:
    """Refuse Elic2022Official weights saved by CompressAI < 1.2.7, whose channel context was a
    channel ramp (hidden widths max(N, ...)) instead of 224 -> 128: different layers, so
    the tensors cannot be converted, only re-trained."""
    first = state.get(_Y + ".channel_context.y1.0.weight")
    if first is not None and first.shape[0] != 224:
        raise ComneckInputError(
            f"codec weights: channel_context.y1 has {first.shape[0]} hidden channels, not 224: an Elic2022Official "
            "checkpoint saved by CompressAI < 1.2.7, whose channel-context layers differ from 1.2.7 on; "
            "its weights cannot be mapped (load it with compressai<1.2.7, or re-train)",
            ErrorCode.BAD_WEIGHTS,
        )
