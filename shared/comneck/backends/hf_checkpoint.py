"""Hugging Face checkpoint folders read shard by shard, and a LLaMA built from a stream of tensors.

The published MLLM folders (Shikra, Honeybee, LLaVA) hold ``config.json`` and either
``model*.safetensors`` or ``pytorch_model*.bin`` shards listed by an ``*.index.json``. Tensors are
read one shard at a time (safetensors lazily, ``.bin`` memory-mapped through
``torch.load(weights_only=True)``) and moved into a model built on the meta device, so loading a
7B model holds one copy of it, in the requested dtype, and one shard's file pages at most.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..errors import ComneckInputError, ErrorCode
from ..importers.reading import check_source, load_torch_file, tensors_only
from .base import BackendContext
from .engines import HFEngine
from .engines.vllm import DEFAULT_TIMEOUT_S, VLLMEngine
from .sp_tokenizer import SentencePieceTokenizer

_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE = ("model.safetensors", "pytorch_model.bin")
#: The LLaMA sizes a published config.json may set (positive integers), then its other fields;
#: what it leaves out keeps transformers' defaults.
_LLAMA_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
_LLAMA_FIELDS = (*_LLAMA_SIZES, "max_position_embeddings", "rms_norm_eps", "hidden_act", "rope_theta")


def bad(folder: Path, why: str) -> ComneckInputError:
    return ComneckInputError(f"{folder}: {why}", ErrorCode.BAD_WEIGHTS)


def read_config(folder: str | Path) -> dict[str, Any]:
    """``config.json`` of a checkpoint folder."""
    folder = Path(folder)
    path = folder / "config.json"
    if not folder.is_dir():
        raise bad(folder, "not a folder (give the checkpoint folder with config.json)")
    if not path.is_file():
        raise bad(folder, "no config.json")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad(folder, f"config.json is not JSON ({exc})") from None


def weight_files(folder: str | Path) -> list[Path]:
    """The folder's weight shards in index order (safetensors preferred when both are there)."""
    folder = Path(folder)
    for index_name in _INDEXES:
        index = folder / index_name
        if index.is_file():
            try:
                names = list(dict.fromkeys(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as exc:
                raise bad(folder, f"{index_name} is not a shard index ({exc})") from None
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise bad(folder, f"shard {missing[0]} listed in {index_name} is missing")
            return [folder / n for n in names]
    for name in _SINGLE:
        if (folder / name).is_file():
            return [folder / name]
    raise bad(folder, "no weights (model*.safetensors or pytorch_model*.bin, with their index when sharded)")


def _open_shard(path: Path) -> Any:
    """One shard opened for reading by key: a safetensors handle (tensors read when asked for), or a
    ``.bin`` state dict memory-mapped through the importers' weights-only loader."""
    if path.suffix == ".safetensors":
        try:
            return safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as exc:
            raise bad(path.parent, f"{path.name} is not a readable safetensors file ({exc})") from None
    check_source(path, path.name)  # a file in no weight format is refused before torch.load sees it
    return tensors_only(load_torch_file(path, path.name, mmap=True), path, path.name)


def _tensor(shard: Any, key: str) -> torch.Tensor:
    return shard[key] if isinstance(shard, dict) else shard.get_tensor(key)


def read_shard(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every (key, tensor) of one shard file."""
    shard = _open_shard(path)
    for key in list(shard.keys()):
        yield key, _tensor(shard, key)


def iter_tensors(folder: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every (key, tensor) of the folder's weights, shard by shard."""
    for path in weight_files(folder):
        yield from read_shard(path)


class LazyTensors:
    """A checkpoint folder's tensors by key, each read only when asked for: safetensors shards
    stay open, ``.bin`` shards memory-mapped, so looking keys up in any order is cheap."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._shards: dict[Path, Any] = {}
        self.index: dict[str, Path] = {}
        for path in weight_files(self.folder):
            self.index.update(dict.fromkeys(self._shard(path).keys(), path))

    def _shard(self, path: Path) -> Any:
        if path not in self._shards:
            self._shards[path] = _open_shard(path)
        return self._shards[path]

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def __getitem__(self, key: str) -> torch.Tensor:
        return _tensor(self._shard(self.index[key]), key)


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[leaf] = tensor


def load_streamed(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], folder: Path,
                  dtype: torch.dtype, device: torch.device) -> None:
    """Fill ``model`` (built on the meta device) from ``(key, tensor)`` pairs whose keys are
    ``model``'s own, cast to ``dtype`` on ``device``; every key must come exactly once and fit."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    seen: set[str] = set()
    for key, tensor in tensors:
        if key not in expected:
            raise bad(folder, f"unexpected weight {key!r}")
        if tuple(tensor.shape) != expected[key]:
            raise bad(folder, f"weight {key!r} has shape {list(tensor.shape)}, expected {list(expected[key])}")
        _assign(model, key, tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype))
        seen.add(key)
    missing = [k for k in expected if k not in seen]
    if missing:
        raise bad(folder, f"{len(missing)} weights missing, e.g. {missing[0]!r}")


def llama_config(fields: Mapping[str, Any], tokenizer: SentencePieceTokenizer, folder: Path) -> Any:
    """A transformers ``LlamaConfig`` from the LLaMA fields of the config.json in ``folder`` (Shikra's
    config, Honeybee's and LLaVA's ``text_config``). Fields left out take LlamaConfig's defaults,
    LLaMA-7B's, as transformers fills them when it reads such a config (llava-hf's ``text_config``
    lists only a few); sizes it sets must be positive integers. bos/eos/pad come from the
    tokenizer: release-era configs carry stale ones (HF-LLaMA 4.28: 0/1/-1)."""
    from transformers import LlamaConfig

    for key in _LLAMA_SIZES:
        value = fields.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad(folder, f"the LLaMA config's {key} is {value!r}, not a positive integer")
    return LlamaConfig(**{k: fields[k] for k in _LLAMA_FIELDS if k in fields}, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)


def llama_from_tensors(config: Any, tensors: Iterable[tuple[str, torch.Tensor]], folder: Path,
                       dtype: torch.dtype, device: torch.device, adapt: Callable[[nn.Module], None] | None = None) -> Any:
    """A transformers ``LlamaForCausalLM`` for ``config`` holding exactly ``tensors``, in eval mode.
    ``adapt`` changes the model while it is still on the meta device, before the tensors go in
    (LLaMA-Adapter swaps in its attention, whose extra parameters then come from ``tensors`` too)."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
        if adapt is not None:
            adapt(model)
    load_streamed(model, tensors, folder, dtype, device)
    # The rotary table is a buffer computed at construction, not stored: build it where the model lives.
    model.model.rotary_emb = LlamaRotaryEmbedding(config).to(device)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"LLaMA tensors left unloaded: {left[:3]}")
    return model.eval()


def embedding_from_tensors(config: Any, tensors: Iterable[tuple[str, torch.Tensor]], folder: Path,
                           dtype: torch.dtype, device: torch.device) -> nn.Embedding:
    """The LLaMA's input embedding table (``model.embed_tokens.weight``) alone, from the same
    stream :func:`llama_from_tensors` reads (drained: its readers collect other parts on the way);
    every other tensor is read and dropped, so only the table stays in memory (vocab x hidden:
    0.26 GB for a 7B LLaMA in fp16, of its 13.5 GB)."""
    table = None
    for key, tensor in tensors:
        if key == "model.embed_tokens.weight":
            table = tensor
    expected = (config.vocab_size, config.hidden_size)
    if table is None or tuple(table.shape) != expected:
        found = "absent" if table is None else f"of shape {list(table.shape)}"
        raise bad(folder, f"the LLaMA's model.embed_tokens.weight is {found}; expected {list(expected)}")
    return nn.Embedding.from_pretrained(table.to(device=device, dtype=dtype), freeze=True)


def llm_engine(config: Any, tensors: Iterable[tuple[str, torch.Tensor]], folder: Path, tokenizer: SentencePieceTokenizer,
               context: BackendContext) -> HFEngine | VLLMEngine:
    """The engine a backend's LLaMA decodes on, as the context's options choose: here, the whole
    LLaMA behind an :class:`HFEngine` (the default), or with ``engine=vllm`` only its input
    embedding table, the LLM itself on the vLLM server at ``engine_url`` (``comneck convert
    --for-vllm`` writes what that server loads)."""
    options = context.options
    if options.get("engine") == "vllm":
        return VLLMEngine(options["engine_url"], embedding_from_tensors(config, tensors, folder, context.dtype, context.device),
                          tokenizer, model=options.get("engine_model"),
                          timeout_s=float(options.get("engine_timeout", DEFAULT_TIMEOUT_S)))
    return HFEngine(llama_from_tensors(config, tensors, folder, context.dtype, context.device), tokenizer)


def write_safetensors(tensors: Iterable[tuple[str, torch.Tensor]], out: Path, shard_bytes: int = 5 * 2**30) -> list[Path]:
    """``tensors`` as ``model.safetensors``, or as shards of at most ``shard_bytes`` named and
    indexed as transformers names them (``model-0000k-of-0000n.safetensors`` + index), in ``out``.
    Holds one shard in memory; returns the files written."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    parts: list[list[str]] = []
    current: dict[str, torch.Tensor] = {}

    def flush() -> None:
        save_file(current, str(out / f"part-{len(parts)}.tmp"), metadata={"format": "pt"})
        parts.append(list(current))
        current.clear()

    size = 0
    for key, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > shard_bytes:
            flush()
            size = 0
        current[key] = tensor.contiguous()
        size += nbytes
    if current:
        flush()
    names = ["model.safetensors"] if len(parts) == 1 else [f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i in range(len(parts))]
    for i, name in enumerate(names):
        (out / f"part-{i}.tmp").replace(out / name)
    if len(parts) > 1:
        index = {"metadata": {}, "weight_map": {key: name for name, keys in zip(names, parts) for key in keys}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return [out / name for name in names]
