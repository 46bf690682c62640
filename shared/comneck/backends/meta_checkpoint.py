"""LLaMA in Meta's own release format, read onto transformers' Llama.

Meta's folders (LLaMA-1 7B, LLaMA-2 7B; the base of LLaMA-Adapter V1 and V2L) hold
``params.json`` (``dim``, ``n_layers``, ``n_heads``, ``multiple_of``, ``norm_eps``, optionally
``ffn_dim_multiplier`` and ``rope_theta``; ``vocab_size`` -1: the tokenizer decides),
``consolidated.00.pth`` and ``tokenizer.model``. Their keys map one to one onto Hugging Face's
(:data:`_LAYER_KEYS`), except that Meta's rotary embedding rotates adjacent pairs of each head's
query/key channels (complex numbers) while transformers rotates the two halves of the head:
``wq`` and ``wk`` rows are permuted per head so the same dot products come out (:func:`to_hf_rotary`).
``rope.freqs`` (a table some releases carry) is computed, not read.

Only one consolidated file is read: 13B and larger releases split each matrix over several
model-parallel files (along the output rows of wq/wk/wv/w1/w3/output, the input columns of
wo/w2 and the embedding's columns), which no backend here needs; they are refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .hf_checkpoint import bad, llama_config, read_shard
from .sp_tokenizer import SentencePieceTokenizer

#: Meta's per-layer key suffixes -> transformers' (``layers.{i}.`` -> ``model.layers.{i}.``).
_LAYER_KEYS = {
    "attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight", "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_KEYS = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_PERMUTED = ("attention.wq.weight", "attention.wk.weight")
_CONTEXT = 2048  # LLaMA-1 and the caption model were trained with sequences of at most 2048 tokens


def ffn_hidden(dim: int, multiple_of: int, multiplier: float | None = None) -> int:
    """The SwiGLU width Meta's ``FeedForward`` derives: 2/3 of 4 * dim, scaled, rounded up to ``multiple_of``."""
    hidden = int(2 * 4 * dim / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def to_hf_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """A Meta ``wq``/``wk`` [heads * head_dim, dim] with each head's rows reordered from
    interleaved pairs (0, 1), (2, 3), ... to halves (0, d/2), (1, d/2 + 1), ..., transformers' layout."""
    rows, cols = weight.shape
    return weight.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


@dataclass(frozen=True)
class MetaLlama:
    """A Meta-format LLaMA folder: its params, tokenizer and the one consolidated file."""

    folder: Path
    params: dict[str, Any]
    tokenizer: SentencePieceTokenizer
    weights: Path

    @classmethod
    def read(cls, folder: str | Path, clean_up: bool = True) -> "MetaLlama":
        """Check the folder's three files (the weights only by name); ``clean_up`` as the tokenizer takes it."""
        folder = Path(folder)
        if not folder.is_dir():
            raise bad(folder, "not a folder (give Meta's LLaMA folder: params.json, consolidated.00.pth, tokenizer.model)")
        params = _read_params(folder)
        shards = sorted(folder.glob("consolidated.*.pth"))
        if not shards:
            raise bad(folder, "no consolidated.00.pth")
        if len(shards) > 1:
            raise bad(folder, f"{len(shards)} consolidated.*.pth files: model-parallel shards (13B and larger) are not "
                              "supported; give the 7B folder (one file)")
        if not (folder / "tokenizer.model").is_file():
            raise bad(folder, "no tokenizer.model")
        return cls(folder, params, SentencePieceTokenizer(folder / "tokenizer.model", clean_up=clean_up), shards[0])

    @property
    def hf_config(self) -> dict[str, Any]:
        """The same model as a transformers LLaMA config dict (vocabulary from the tokenizer)."""
        p = self.params
        return {
            "vocab_size": self.tokenizer.vocab_size, "hidden_size": p["dim"], "num_hidden_layers": p["n_layers"],
            "num_attention_heads": p["n_heads"], "rms_norm_eps": p["norm_eps"], "rope_theta": p.get("rope_theta", 10000.0),
            "intermediate_size": ffn_hidden(p["dim"], p["multiple_of"], p.get("ffn_dim_multiplier")),
            "max_position_embeddings": _CONTEXT,
        }

    def config(self) -> Any:
        """A transformers ``LlamaConfig`` for this model."""
        return llama_config(self.hf_config, self.tokenizer, self.folder)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The weights under transformers' keys, wq/wk permuted, one tensor at a time (memory-mapped)."""
        heads, dim, vocab = self.params["n_heads"], self.params["dim"], self.tokenizer.vocab_size
        for key, tensor in read_shard(self.weights):
            if key == "rope.freqs":
                continue
            if key in _TOP_KEYS:
                if key != "norm.weight" and tensor.shape[0] != vocab:
                    raise bad(self.folder, f"the tokenizer has {vocab} pieces; {key} has {tensor.shape[0]} rows")
                yield _TOP_KEYS[key], tensor
                continue
            layer, _, suffix = key.removeprefix("layers.").partition(".")
            if not key.startswith("layers.") or not layer.isdigit() or suffix not in _LAYER_KEYS:
                raise bad(self.folder, f"{self.weights.name}: unexpected weight {key!r} (not a Meta LLaMA key)")
            if suffix in _PERMUTED:
                if tuple(tensor.shape) != (dim, dim):
                    raise bad(self.folder, f"{key} has shape {list(tensor.shape)}, expected [{dim}, {dim}]")
                tensor = to_hf_rotary(tensor, heads)
            yield f"model.layers.{layer}.{_LAYER_KEYS[suffix]}", tensor


def _read_params(folder: Path) -> dict[str, Any]:
    """``params.json``, its sizes checked: positive integers, a float ``norm_eps``, heads dividing ``dim``."""
    path = folder / "params.json"
    if not path.is_file():
        raise bad(folder, "no params.json")
    try:
        params = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad(folder, f"params.json is not JSON ({exc})") from None
    if not isinstance(params, dict):
        raise bad(folder, "params.json is not a JSON object")
    for key in ("dim", "n_layers", "n_heads", "multiple_of"):
        value = params.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad(folder, f"params.json's {key} is {value!r}, not a positive integer")
    for key in ("norm_eps", "ffn_dim_multiplier", "rope_theta"):
        value = params.get(key)
        optional = key != "norm_eps" and value is None
        if not optional and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise bad(folder, f"params.json's {key} is {value!r}, not a positive number")
    if params["dim"] % (2 * params["n_heads"]):
        raise bad(folder, f"params.json's dim {params['dim']} is not a multiple of 2 * n_heads ({params['n_heads']})")
    if params.get("n_kv_heads", params["n_heads"]) != params["n_heads"]:
        raise bad(folder, "params.json sets n_kv_heads (grouped-query attention, LLaMA-2 34B/70B): not supported")
    return params
