"""``comneck convert SOURCE --for-vllm -o OUT``: the language model of a Shikra, Honeybee or LLaVA
checkpoint alone, as a plain ``LlamaForCausalLM`` folder for ``vllm serve OUT --enable-prompt-embeds``.

With ``--backend NAME=WEIGHTS,engine=vllm`` the gateway keeps the vision side (CLIP tail,
projector or abstractor) and the input embedding table, and sends whole prompts as embeddings;
vLLM needs only the LLaMA. The folder holds ``config.json`` (``architectures
["LlamaForCausalLM"]``, ``model_type "llama"``, the backend's own LLaMA fields, bos/eos/pad from
its tokenizer), the LLM's tensors under ``LlamaForCausalLM``'s keys in safetensors shards (in
the checkpoint's dtype) and the tokenizer files:

* Shikra: the merged LM (a delta added to its ``base`` first) without ``model.mm_projector.*``;
  its vocabulary keeps the 3 added image tokens (32003 rows for Shikra-7B);
* Honeybee: the ``language_model.*`` keys, prefix dropped (the tokenizer from the folder or ``tokenizer``);
* LLaVA: its text model (either key layout), projector and vision tower left out.

The tensors come from the same readers the backends load with (:func:`.shikra.merged_tensors`,
:func:`.honeybee.split_tensors`, :func:`.llava.split_tensors`), so vLLM serves the LLM the
local engine would run. No generation_config.json is written: the vLLM engine sets every
sampling parameter itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..errors import ComneckInputError, ErrorCode
from .hf_checkpoint import llama_config, read_config, write_safetensors
from .sp_tokenizer import SentencePieceTokenizer

#: Tokenizer files copied beside ``tokenizer.model`` when its folder has them.
_TOKENIZER_FILES = ("added_tokens.json", "special_tokens_map.json", "tokenizer_config.json")


class LanguageModel(NamedTuple):
    """A checkpoint's LLaMA: which backend it came from, its config, tensors and tokenizer."""

    backend: str
    config: Any  # transformers' LlamaConfig
    tensors: Iterable[tuple[str, torch.Tensor]]
    tokenizer: SentencePieceTokenizer


def language_model(folder: Path, base: Path | None = None, tokenizer: Path | None = None) -> LanguageModel:
    """The LLaMA of the checkpoint ``folder``, whose config.json says which backend's it is
    (``base``: a Shikra delta's LLaMA; ``tokenizer``: Honeybee's, when the folder has none)."""
    model_type = read_config(folder).get("model_type")
    if model_type == "shikra":
        from .shikra import ShikraWeights, merged_tensors, split_projector

        weights = ShikraWeights(folder, base)
        sp = SentencePieceTokenizer.from_folder(folder)
        return LanguageModel("shikra", llama_config(weights.config, sp, folder), split_projector(merged_tensors(weights), {}), sp)
    if base is not None:
        raise ComneckInputError("--base goes with a Shikra delta folder", ErrorCode.BAD_SETTINGS)
    if model_type == "mllm":
        from .honeybee import read_tokenizer, split_tensors as honeybee_tensors

        sp = read_tokenizer(folder, None if tokenizer is None else str(tokenizer))
        return LanguageModel("honeybee", llama_config(read_config(folder)["text_config"], sp, folder), honeybee_tensors(folder, {}), sp)
    if tokenizer is not None:
        raise ComneckInputError("--tokenizer goes with a Honeybee folder", ErrorCode.BAD_SETTINGS)
    if model_type == "llava":
        from .llava import CheckpointConfig, split_tensors as llava_tensors

        sp = SentencePieceTokenizer.from_folder(folder)
        return LanguageModel("llava", llama_config(CheckpointConfig.read(folder).text, sp, folder), llava_tensors(folder, {}), sp)
    raise ComneckInputError(f"{folder}: config.json's model_type {model_type!r} is none of shikra, mllm (Honeybee), llava: "
                            "--for-vllm exports those backends' language models", ErrorCode.BAD_WEIGHTS)


def write_for_vllm(folder: Path, out: Path, base: Path | None = None, tokenizer: Path | None = None,
                   shard_bytes: int = 5 * 2**30) -> tuple[str, list[Path]]:
    """Write the folder vLLM serves for the checkpoint ``folder`` into ``out``; returns the backend's
    name and the weight files written. Holds one shard in memory."""
    lm = language_model(folder, base, tokenizer)
    dtypes: set[torch.dtype] = set()

    def noting_dtype() -> Iterator[tuple[str, torch.Tensor]]:
        for key, tensor in lm.tensors:
            dtypes.add(tensor.dtype)
            yield key, tensor

    files = write_safetensors(noting_dtype(), out, shard_bytes)
    config = {**lm.config.to_dict(), "architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    if len(dtypes) == 1:  # what vLLM's --dtype auto serves in
        config["torch_dtype"] = str(dtypes.pop()).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    source = lm.tokenizer.model_file
    (out / "tokenizer.model").write_bytes(source.read_bytes())
    for name in _TOKENIZER_FILES:
        if (source.parent / name).is_file():
            (out / name).write_bytes((source.parent / name).read_bytes())
    return lm.backend, files
