"""CLIP weights from the layouts they are published in, onto open_clip's ``CLIP``.

ComNeck runs CLIP as an open_clip model, so every file is mapped to open_clip's key names
(``visual.*``, ``token_embedding.weight``, ``transformer.*``, ...). Layouts read:

* ``open_clip``: open_clip's own state dict, which is also OpenAI's (``openai`` pretrained
  files, open_clip training checkpoints under ``state_dict``, DDP's ``module.`` prefix);
* ``openai-torchscript``: OpenAI's original TorchScript ``ViT-L-14.pt``, the same names plus
  the scalars ``input_resolution``, ``context_length``, ``vocab_size`` (dropped);
* ``hf-clip`` / ``hf-vision``: Hugging Face transformers ``CLIPModel``, or its vision tower alone
  (``CLIPVisionModel`` with or without transformers 4's ``vision_model.`` prefix,
  ``CLIPVisionModelWithProjection``).

A file may lack whole parts (a vision-only file has no text tower); those parts keep the
model's seeded random weights and are reported in :attr:`ImportedClip.missing_parts`. A file
that lacks only some keys of a part, holds keys no rule knows, or holds tensors of another
architecture is refused with code ``bad_weights``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch

from ..errors import ComneckInputError, ErrorCode
from ..weights_folder import part_file
from .fitting import fit, listing
from .reading import file_format, read_weights, strip_prefix, tensors_only

WHAT = "CLIP"

LAYOUTS = ("open_clip", "openai-torchscript", "hf-clip", "hf-vision")

#: Parts a file may lack as a whole, in the order they are reported.
VISION_TOWER, VISUAL_PROJECTION, TEXT_TOWER = "vision tower", "visual projection", "text tower"
PARTS = (VISION_TOWER, VISUAL_PROJECTION, TEXT_TOWER)

# Scalars OpenAI's TorchScript model keeps in its state dict (its loader reads and deletes
# them), and open_clip's causal mask, which older checkpoints saved but the model rebuilds.
_TORCHSCRIPT_SCALARS = frozenset({"input_resolution", "context_length", "vocab_size"})
_DROPPED_OPEN_CLIP = _TORCHSCRIPT_SCALARS | {"attn_mask"}

# One transformer block in open_clip's names; the same in both towers.
_BLOCK = r"(?:ln_1|ln_2|attn\.out_proj|mlp\.c_fc|mlp\.c_proj)\.(?:weight|bias)|attn\.in_proj_(?:weight|bias)"
_OPEN_CLIP_KEY = re.compile(
    r"visual\.(?:class_embedding|positional_embedding|proj|conv1\.weight"
    r"|(?:ln_pre|ln_post)\.(?:weight|bias)"
    rf"|transformer\.resblocks\.\d+\.(?:{_BLOCK}))"
    r"|token_embedding\.weight|positional_embedding|text_projection|logit_scale"
    r"|ln_final\.(?:weight|bias)"
    rf"|transformer\.resblocks\.\d+\.(?:{_BLOCK})"
)

# Hugging Face -> open_clip names, written out by hand from transformers' modeling_clip.py and
# open_clip's transformer.py: both are the same pre-norm ViT / causal text transformer, only
# the names differ (and "pre_layrnorm" is spelt so in transformers).
_HF_RENAMES = {
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "logit_scale": "logit_scale",  # both keep log(1 / temperature)
}
# nn.Linear(width, embed, bias=False) computes x @ W.T; open_clip keeps the (width, embed)
# matrix and computes x @ proj, so these two are transposed.
_HF_TRANSPOSED = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}
# Index buffers transformers rebuilds (older files saved them).
_HF_DROPPED = frozenset({"vision_model.embeddings.position_ids", "text_model.embeddings.position_ids"})
_HF_LAYER = re.compile(r"(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)")
_HF_TOWER = {"vision_model": "visual.transformer.resblocks", "text_model": "transformer.resblocks"}
_HF_BLOCK = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
# transformers projects q, k, v with three Linears; torch's MultiheadAttention (open_clip) with
# one packed in_proj whose rows are q, then k, then v.
_HF_QKV = re.compile(r"self_attn\.([qkv])_proj\.(weight|bias)")


@dataclass(frozen=True)
class ImportedClip:
    """A CLIP state dict in open_clip key names, the layout it came from, and the parts the
    file did not hold (they keep the model's own weights when loaded)."""

    state: dict[str, torch.Tensor]
    layout: str
    missing_parts: tuple[str, ...]


def _bad(source: str, why: str) -> ComneckInputError:
    where = f"{source}: " if source else ""
    return ComneckInputError(f"{WHAT} weights: {where}{why}", ErrorCode.BAD_WEIGHTS)


def part_of(key: str) -> str:
    """Which part (:data:`PARTS`) an open_clip key belongs to. ``logit_scale`` goes with the
    text tower: it only scales image-text similarities, useless without a text tower."""
    if key == "visual.proj":
        return VISUAL_PROJECTION
    if key.startswith("visual."):
        return VISION_TOWER
    return TEXT_TOWER


def _is_hf(keys: list[str]) -> bool:
    return any(k.startswith(("vision_model.", "text_model.")) or k in _HF_TRANSPOSED for k in keys)


# transformers 5 saves CLIPVisionModel / CLIPTextModel without their tower's prefix
# ("embeddings.patch_embedding.weight", "encoder.layers.0....", "pre_layrnorm.weight");
# transformers 4 wrote "vision_model." / "text_model." in front, as CLIPModel still does.
# Keys that only those bare towers hold tell them from other models' state dicts.
_HF_BARE_VISION = frozenset({"embeddings.patch_embedding.weight", "pre_layrnorm.weight", "post_layernorm.weight"})
_HF_BARE_TEXT = frozenset({"embeddings.token_embedding.weight", "final_layer_norm.weight"})


def _with_hf_tower_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A bare transformers-5 tower state dict given its tower prefix; other dicts as they are."""
    if _is_hf(list(state)):
        return state
    if _HF_BARE_VISION & state.keys():
        tower = "vision_model"
    elif _HF_BARE_TEXT & state.keys():
        tower = "text_model"
    else:
        return state
    return {f"{tower}.{k}": v for k, v in state.items()}


def _from_open_clip(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    unknown = [k for k in state if k not in _DROPPED_OPEN_CLIP and not _OPEN_CLIP_KEY.fullmatch(k)]
    if len(unknown) == len(state):
        raise _bad(source, f"holds no CLIP keys of any known layout (it holds {listing(unknown)})")
    if unknown:
        raise _bad(source, f"keys of no known CLIP layout ({len(unknown)}): {listing(unknown)}")
    return {k: v for k, v in state.items() if k not in _DROPPED_OPEN_CLIP}


def _transposed(key: str, tensor: torch.Tensor, source: str) -> torch.Tensor:
    if tensor.dim() != 2:
        raise _bad(source, f"{key} must be a matrix, got shape {list(tensor.shape)}")
    return tensor.t().contiguous()  # contiguous: safetensors writes only dense tensors


def _from_hf(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # (block prefix, weight|bias) -> q/k/v
    unknown: list[str] = []
    for key, tensor in state.items():
        if key in _HF_DROPPED:
            continue
        if key in _HF_RENAMES:
            out[_HF_RENAMES[key]] = tensor
            continue
        if key in _HF_TRANSPOSED:
            out[_HF_TRANSPOSED[key]] = _transposed(key, tensor, source)
            continue
        layer = _HF_LAYER.fullmatch(key)
        if layer:
            tower, index, rest = layer.groups()
            block = f"{_HF_TOWER[tower]}.{index}"
            module, _, param = rest.rpartition(".")
            if module in _HF_BLOCK and param in ("weight", "bias"):
                out[f"{block}.{_HF_BLOCK[module]}.{param}"] = tensor
                continue
            proj = _HF_QKV.fullmatch(rest)
            if proj:
                qkv.setdefault((f"{tower}.encoder.layers.{index}", proj[2]), {})[proj[1]] = tensor
                continue
        unknown.append(key)
    if unknown:
        raise _bad(source, f"keys of no known CLIP layout ({len(unknown)}): {listing(unknown)}")
    incomplete: list[str] = []
    uneven: list[str] = []
    for (prefix, param), parts in qkv.items():
        lacking = [f"{prefix}.self_attn.{p}_proj.{param}" for p in "qkv" if p not in parts]
        if lacking:
            incomplete += lacking
            continue
        if len({parts[p].shape for p in "qkv"}) != 1:
            uneven.append(f"{prefix}.self_attn.{{q,k,v}}_proj.{param}")
            continue
        tower, index = prefix.split(".encoder.layers.")
        out[f"{_HF_TOWER[tower]}.{index}.attn.in_proj_{param}"] = torch.cat([parts[p] for p in "qkv"])
    if incomplete:
        raise _bad(source, f"attention projections missing ({len(incomplete)}): {listing(incomplete)}")
    if uneven:
        raise _bad(source, f"q, k, v projections of unequal shapes: {listing(uneven)}")
    return out


def _clip_from_state(state: dict[str, torch.Tensor], layout_hint: str, source: str) -> ImportedClip:
    if layout_hint and layout_hint not in LAYOUTS:
        raise ValueError(f"unknown CLIP layout hint {layout_hint!r}; choose one of {', '.join(LAYOUTS)}")
    if not state:
        raise _bad(source, "holds no tensors")
    state = _with_hf_tower_prefix(state)
    keys = list(state)
    if _is_hf(keys):
        mapped = _from_hf(state, source)
        layout = "hf-clip" if any(k.startswith("text_model.") for k in keys) else "hf-vision"
        family = ("hf-clip", "hf-vision")
    else:
        mapped = _from_open_clip(state, source)
        scripted = layout_hint == "openai-torchscript" or bool(_TORCHSCRIPT_SCALARS & set(keys))
        layout = "openai-torchscript" if scripted else "open_clip"
        family = ("open_clip", "openai-torchscript")
    if layout_hint and layout_hint not in family:
        raise _bad(source, f"keys are in the {layout} layout, not {layout_hint}")
    present = {part_of(k) for k in mapped}
    if VISION_TOWER not in present:
        raise _bad(source, "holds no CLIP vision tower (no visual.* / vision_model.* keys)")
    missing = tuple(part for part in PARTS if part not in present)
    return ImportedClip(state=mapped, layout=layout, missing_parts=missing)


def clip_from_state(state: dict[str, torch.Tensor], layout_hint: str = "") -> ImportedClip:
    """Detect the layout of a CLIP state dict from its keys and map it to open_clip names.

    ``layout_hint`` (one of :data:`LAYOUTS`, or empty) tells what the container said, e.g.
    ``openai-torchscript`` for a TorchScript archive; it must agree with the keys.
    Keys no rule knows are refused here; shapes are checked by :func:`load_clip`.
    """
    return _clip_from_state(strip_prefix(state), layout_hint, "")


def read_clip(path: str | Path) -> ImportedClip:
    """Read a CLIP weight file (safetensors, ``torch.save``, TorchScript) of any layout
    :func:`clip_from_state` knows; a dict wrapping the state under ``state_dict`` or
    ``model`` (training checkpoints) is unwrapped."""
    path = Path(path)
    if path.is_dir():  # a weights folder
        path = part_file(path, "clip")
    return clip_from_object(read_weights(path, WHAT), path)


def clip_from_object(obj: Any, path: Path) -> ImportedClip:
    """:func:`read_clip` on an object already read from ``path``."""
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    state = strip_prefix(tensors_only(obj, path, WHAT))
    hint = "openai-torchscript" if file_format(path) == "torchscript" else ""
    return _clip_from_state(state, hint, str(path))


def load_clip(model: open_clip.CLIP, imported: ImportedClip) -> None:
    """Copy ``imported`` into ``model``, refusing (``bad_weights``) missing, unexpected or
    mis-shaped keys; parts listed in ``missing_parts`` are left as they are."""
    absent = set(imported.missing_parts)
    fit(model, imported.state, f"{WHAT} ({imported.layout})", derived=lambda key: part_of(key) in absent)
