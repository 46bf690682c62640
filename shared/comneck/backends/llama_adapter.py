"""LLaMA-Adapter V1 captioning (the csuhan/LLaMA-Adapter Space's caption model; the code read is
NYCU-MAPL/BridgingCompressionMLLM @ 63f47823 ``Inference/LLaMA-Adapter-V1/llama/model.py``).

CLIP's projected tokens (``ln_post`` over all 257 tokens, then ``@ proj``: 257 x 768) go through
the caption connector (:class:`VisualPrompt`: ``clip_proj`` + LayerNorm, 10 learned queries
concatenated in front, two timm ViT blocks, the 10 query outputs through ``visual_proj`` +
LayerNorm: 10 x 4096). In each of the last 30 of LLaMA-7B's 32 layers, the adaption prompt is
that layer's 10 rows of ``cap_adapter_query`` plus the visual tokens; its keys and values come
from the layer's own ``k_proj``/``v_proj`` (no rotary embedding), the layer's (rotated) queries
attend to them in a separate softmax with no mask, and the result, gated per head by
``tanh(cap_gate)``, is added to the ordinary causal attention's output before ``o_proj``.

How that is built on transformers' LLaMA (not a copy of it): :class:`AdapterAttention` is
``LlamaAttention`` plus the layer's adapter parameters (``adapter_query`` [10, dim],
``cap_gate`` [1, heads, 1, 1]) and the adapter keys/values of the batch being decoded. Its
forward is transformers' own; the extension is the attention function it dispatches to
(``config._attn_implementation = "comneck_llama_adapter"``, registered with transformers'
``AttentionInterface``): transformers' SDPA attention plus :meth:`AdapterAttention.adapter_output`
for the queries it is given. So the adapter term is added at every step, prompt and decoded
tokens alike, whatever the KV cache holds, and per batch row (left padding changes nothing:
the adapter softmax has no mask and the padded positions are never attended to).

Weights: the published caption adapter ``llama_adapter_len10_layer30_caption_vit_l.pth`` and
LLaMA-7B in Meta's format (:mod:`.meta_checkpoint`), or the folder ``comneck convert`` writes
from them (:func:`write_converted`). The official loader also reads the instruct adapter
(``llama_adapter_len10_layer30_release.pth``), but only to size the instruct branch that
captioning never runs: it is not needed here.

Prompt: ``"Generate caption of this image :"`` with BOS (the official caption path); a request's
own prompt, if not empty, takes its place. Decoding follows each item's options (greedy at
temperature 0); the official evaluation sampled at temperature 0.1, top-p 0.75.

Precision: the official code builds the connector and LLaMA in float16 (the default tensor type
while they are built) and casts the float32 CLIP features to float16 before ``clip_proj``; here
the features are cast to the backend's dtype, so ``--dtype float16`` reproduces that cast.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import Block
from torch import nn
from transformers import AttentionInterface, LlamaConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.llama.modeling_llama import LlamaAttention

from ..errors import ComneckInputError, ErrorCode
from .base import BackendAnswer, BackendContext, BackendSpec, GenerationOptions, ImageInfo
from .engines import Generation, HFEngine, runs
from .hf_checkpoint import LazyTensors, bad, llama_config, llama_from_tensors, load_streamed, read_config, read_shard, write_safetensors
from .meta_checkpoint import MetaLlama
from .sp_tokenizer import SentencePieceTokenizer

PROMPT = "Generate caption of this image :"
ATTENTION = "comneck_llama_adapter"
MODEL_TYPE = "comneck-llama-adapter-v1"
VISION = "vision_model."  # the connector's keys in a converted folder
VISION_HEADS = 16  # hard-coded in the official VisionModel
_VISION_KEYS = ("clip_proj.", "clip_proj_norm.", "visual_query.", "visual_blocks.", "visual_proj.", "visual_proj_norm.")
#: Keys of the published file that captioning does not read: the gateway's own CLIP, the instruct branch.
_IGNORED = ("clip.", "clip_model.", "adapter_query.weight")


class AdapterAttention(LlamaAttention):
    """transformers' ``LlamaAttention`` with one layer's caption adapter: ``adapter_query``
    [len, hidden], ``cap_gate`` [1, heads, 1, 1], and the adapter keys/values of the current
    batch (:meth:`set_visual`), which the ``comneck_llama_adapter`` attention function adds."""

    def __init__(self, config: LlamaConfig, layer_idx: int, adapter_len: int) -> None:
        super().__init__(config, layer_idx)
        self.adapter_query = nn.Parameter(torch.empty(adapter_len, config.hidden_size))
        self.cap_gate = nn.Parameter(torch.empty(1, config.num_attention_heads, 1, 1))
        self.adapter_kv: tuple[torch.Tensor, torch.Tensor] | None = None

    def set_visual(self, visual: torch.Tensor | None) -> None:
        """Visual tokens [B, len, hidden] -> this layer's adapter keys and values [B, heads, len,
        head_dim] for the forwards to come (computed once per batch); None forgets them."""
        if visual is None:
            self.adapter_kv = None
            return
        adapter = self.adapter_query + visual
        shape = (*adapter.shape[:-1], -1, self.head_dim)
        self.adapter_kv = (self.k_proj(adapter).view(shape).transpose(1, 2), self.v_proj(adapter).view(shape).transpose(1, 2))

    def adapter_output(self, query: torch.Tensor) -> torch.Tensor:
        """The gated adapter attention for ``query`` [B, heads, T, head_dim] (after RoPE):
        ``tanh(cap_gate) * softmax(q k_a^T / sqrt(d)) v_a``, as [B, T, heads, head_dim]."""
        if self.adapter_kv is None:
            raise RuntimeError("LLaMA-Adapter's attention ran without visual tokens (set_visual first)")
        keys, values = self.adapter_kv
        probs = torch.softmax(torch.matmul(query, keys.transpose(2, 3)) * self.scaling, dim=-1, dtype=torch.float32)
        return (self.cap_gate.tanh() * torch.matmul(probs.to(query.dtype), values)).transpose(1, 2)


def _adapter_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """transformers' SDPA attention, plus the adapter term in the layers that have one."""
    output, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if isinstance(module, AdapterAttention):
        output = output + module.adapter_output(query)
    return output, weights


AttentionInterface.register(ATTENTION, _adapter_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def adapt_layers(adapter_layers: int, adapter_len: int) -> Callable[[nn.Module], None]:
    """For :func:`llama_from_tensors`: give the last ``adapter_layers`` layers an :class:`AdapterAttention`."""

    def adapt(model: nn.Module) -> None:
        layers = model.model.layers
        for index in range(len(layers) - adapter_layers, len(layers)):
            layers[index].self_attn = AdapterAttention(model.config, index, adapter_len)

    return adapt


class VisualPrompt(nn.Module):
    """The caption model's trainable vision part (the official ``VisionModel`` without its CLIP),
    under the official key names: projected CLIP tokens [B, T, clip_dim] -> visual tokens [B, queries, hidden]."""

    def __init__(self, clip_dim: int, width: int, hidden: int, queries: int, blocks: int) -> None:
        super().__init__()
        self.clip_proj = nn.Linear(clip_dim, width)
        self.clip_proj_norm = nn.LayerNorm(width)
        self.visual_query = nn.Embedding(queries, width)
        self.visual_blocks = nn.ModuleList(
            Block(width, VISION_HEADS, 4.0, qkv_bias=True, norm_layer=nn.LayerNorm) for _ in range(blocks))
        self.visual_proj = nn.Linear(width, hidden)
        self.visual_proj_norm = nn.LayerNorm(hidden)

    @classmethod
    def sized_for(cls, state: dict[str, torch.Tensor], folder: Path) -> "VisualPrompt":
        """An empty (meta) connector of the sizes ``state``'s key tensors give (its shapes are checked on loading)."""
        for key in ("clip_proj.weight", "visual_query.weight", "visual_proj.weight"):
            if key not in state or state[key].ndim != 2:
                raise bad(folder, f"no 2-d {key!r} (the caption adapter's vision part)")
        width, clip_dim = state["clip_proj.weight"].shape
        if width % VISION_HEADS:
            raise bad(folder, f"clip_proj.weight has {width} rows, not a multiple of the {VISION_HEADS} vision heads")
        blocks = len({key.split(".")[1] for key in state if key.startswith("visual_blocks.")})
        with torch.device("meta"):
            return cls(clip_dim, width, state["visual_proj.weight"].shape[0], state["visual_query.weight"].shape[0], blocks)

    @property
    def clip_dim(self) -> int:
        return self.clip_proj.in_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.clip_proj_norm(self.clip_proj(features))
        x = torch.cat([self.visual_query.weight.expand(len(x), -1, -1), x], dim=1)
        for block in self.visual_blocks:
            x = block(x)
        return self.visual_proj_norm(self.visual_proj(x[:, : self.visual_query.num_embeddings]))


@dataclass
class AdapterCheckpoint:
    """A caption model, published (adapter file + Meta LLaMA folder) or converted, ready to
    stream: its LLaMA config, tokenizer, adapter sizes, the connector's tensors (official keys)
    and the LLM's tensors under the adapted transformers model's keys (:meth:`llm_tensors`)."""

    where: Path
    llama: dict[str, Any]  # transformers LLaMA config fields
    tokenizer: SentencePieceTokenizer
    adapter_len: int
    adapter_layers: int
    vision: dict[str, torch.Tensor]
    llm_tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]]

    @classmethod
    def published(cls, adapter_file: Path, llama_folder: Path) -> "AdapterCheckpoint":
        """The caption adapter ``.pth`` and Meta's LLaMA folder."""
        llama = MetaLlama.read(llama_folder, clean_up=False)
        state = dict(read_shard(adapter_file))
        layers = llama.params["n_layers"]
        vision = {k: v for k, v in state.items() if k.startswith(_VISION_KEYS)}
        if "cap_adapter_query.weight" not in state:
            raise bad(adapter_file, "no 'cap_adapter_query.weight' (not LLaMA-Adapter V1's caption adapter)")
        VisualPrompt.sized_for(vision, adapter_file)  # the vision keys the sizes come from are there
        query, adapter_len = state["cap_adapter_query.weight"], vision["visual_query.weight"].shape[0]
        if query.ndim != 2 or query.shape[1] != llama.params["dim"] or query.shape[0] % adapter_len:
            raise bad(adapter_file, f"cap_adapter_query.weight has shape {list(query.shape)}; want [layers * {adapter_len}, "
                                    f"{llama.params['dim']}] for this LLaMA")
        adapter_layers = query.shape[0] // adapter_len
        if not 0 < adapter_layers <= layers:
            raise bad(adapter_file, f"cap_adapter_query.weight adapts {adapter_layers} layers; the LLaMA has {layers}")
        first = layers - adapter_layers
        for key in state:
            index, _, suffix = key.removeprefix("layers.").partition(".")
            gate = key.startswith("layers.") and index.isdigit() and int(index) < layers and suffix in ("attention.cap_gate", "attention.gate")
            if not gate and key not in vision and key != "cap_adapter_query.weight" and not key.startswith(_IGNORED):
                raise bad(adapter_file, f"unexpected weight {key!r} (not a LLaMA-Adapter V1 caption key)")
        extra: dict[str, torch.Tensor] = {}
        for j, index in enumerate(range(first, layers)):
            if f"layers.{index}.attention.cap_gate" not in state:
                raise bad(adapter_file, f"no 'layers.{index}.attention.cap_gate' (layer {index} is one of the {adapter_layers} adapted)")
            extra[f"model.layers.{index}.self_attn.cap_gate"] = state[f"layers.{index}.attention.cap_gate"]
            extra[f"model.layers.{index}.self_attn.adapter_query"] = query[j * adapter_len : (j + 1) * adapter_len].clone()

        def llm_tensors() -> Iterator[tuple[str, torch.Tensor]]:
            yield from llama.tensors()
            yield from extra.items()

        return cls(adapter_file, llama.hf_config, llama.tokenizer, adapter_len, adapter_layers, vision, llm_tensors)

    @classmethod
    def converted(cls, folder: Path) -> "AdapterCheckpoint":
        """A folder :func:`write_converted` wrote."""
        config = read_config(folder)
        if config.get("model_type") != MODEL_TYPE or not isinstance(config.get("llama"), dict):
            raise bad(folder, f"config.json is not a converted LLaMA-Adapter V1 (model_type {config.get('model_type')!r}, "
                              f"want {MODEL_TYPE!r} with a llama config)")
        if not (folder / "tokenizer.model").is_file():
            raise bad(folder, "no tokenizer.model")
        sizes = [config.get("adapter_len"), config.get("adapter_layers"), config["llama"].get("num_hidden_layers")]
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in sizes) or sizes[1] > sizes[2]:
            raise bad(folder, f"config.json's adapter_len, adapter_layers and llama.num_hidden_layers {sizes} are not "
                              "positive integers with adapter_layers <= num_hidden_layers")
        tensors = LazyTensors(folder)  # each tensor read when asked for: the LLM's are not read for the connector's
        vision = {k[len(VISION):]: tensors[k] for k in tensors.index if k.startswith(VISION)}

        def llm_tensors() -> Iterator[tuple[str, torch.Tensor]]:
            return ((k, tensors[k]) for k in tensors.index if not k.startswith(VISION))

        return cls(folder, config["llama"], SentencePieceTokenizer(folder / "tokenizer.model", clean_up=False),
                   sizes[0], sizes[1], vision, llm_tensors)

    def write(self, out: Path, shard_bytes: int = 5 * 2**30) -> list[Path]:
        """``comneck convert``: config.json, tokenizer.model and the tensors as safetensors
        (shards of at most ``shard_bytes``) in ``out``."""
        files = write_safetensors(self._all_tensors(), out, shard_bytes)
        config = {"model_type": MODEL_TYPE, "llama": self.llama, "adapter_len": self.adapter_len,
                  "adapter_layers": self.adapter_layers, "prompt": PROMPT}
        (out / "config.json").write_text(json.dumps(config, indent=2))
        (out / "tokenizer.model").write_bytes(self.tokenizer.sp.serialized_model_proto())
        return files

    def _all_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self.llm_tensors()
        yield from ((VISION + k, v) for k, v in self.vision.items())


def open_checkpoint(weights: Path, llama: str | None) -> AdapterCheckpoint:
    """A converted folder, or the caption adapter file with the ``llama`` option (Meta's LLaMA folder)."""
    if weights.is_dir():
        return AdapterCheckpoint.converted(weights)
    if llama is None:
        raise ComneckInputError(f"{weights}: give Meta's LLaMA-7B folder too: --backend llama-adapter-v1={weights},llama=LLAMA_DIR",
                                ErrorCode.BAD_SETTINGS)
    return AdapterCheckpoint.published(weights, Path(llama))


class LlamaAdapterV1:
    """A loaded LLaMA-Adapter V1 caption model: the connector, the adapted LLaMA behind an
    :class:`HFEngine`, and Meta's tokenizer."""

    random_weights = False  # it loads published weights only

    def __init__(self, spec: BackendSpec, engine: HFEngine, connector: VisualPrompt, tokenizer: SentencePieceTokenizer,
                 context_length: int) -> None:
        self.spec = spec
        self.engine = engine
        self.connector = connector
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.adapted = [m for m in engine.model.modules() if isinstance(m, AdapterAttention)]
        self._lock = threading.Lock()  # the adapter keys/values live on the layers while a batch decodes

    @classmethod
    def load(cls, context: BackendContext) -> "LlamaAdapterV1":
        """Read the checkpoint (converted folder, or adapter file + ``llama`` option) onto the context's device and dtype."""
        if context.weights is None:
            raise ComneckInputError("llama-adapter-v1 needs its weights: llama_adapter_len10_layer30_caption_vit_l.pth with "
                                    "llama=LLAMA_DIR, or a folder from comneck convert", ErrorCode.BAD_SETTINGS)
        checkpoint = open_checkpoint(context.weights, context.options.get("llama"))
        connector = VisualPrompt.sized_for(checkpoint.vision, checkpoint.where)
        clip_dim = int(context.clip_config.model_cfg["embed_dim"])
        if connector.clip_dim != clip_dim:
            raise bad(checkpoint.where, f"clip_proj reads width {connector.clip_dim}; this gateway's CLIP "
                                        f"({context.clip_config.name}) projects to {clip_dim}: another vision tower")
        load_streamed(connector, checkpoint.vision.items(), checkpoint.where, context.dtype, context.device)
        config = llama_config(checkpoint.llama, checkpoint.tokenizer, checkpoint.where)
        if config.vocab_size != checkpoint.tokenizer.vocab_size:
            raise bad(checkpoint.where, f"the tokenizer has {checkpoint.tokenizer.vocab_size} pieces, the config says vocab_size {config.vocab_size}")
        if connector.visual_proj.out_features != config.hidden_size:
            raise bad(checkpoint.where, f"visual_proj writes width {connector.visual_proj.out_features}; the LLaMA's is {config.hidden_size}")
        config._attn_implementation = ATTENTION
        llama = llama_from_tensors(config, checkpoint.llm_tensors(), checkpoint.where, context.dtype, context.device,
                                   adapt_layers(checkpoint.adapter_layers, checkpoint.adapter_len))
        return cls(context.spec, HFEngine(llama, checkpoint.tokenizer), connector.eval(), checkpoint.tokenizer,
                   config.max_position_embeddings)

    def prompt_ids(self, prompt: str) -> list[int]:
        """BOS and the instruction: the official one for an empty prompt, else the request's."""
        return self.tokenizer.encode(prompt.strip() or PROMPT)

    def check_prompt(self, prompt: str, task: str, options: GenerationOptions, choices: Sequence[str] = ()) -> None:
        ids = self.prompt_ids(prompt)
        if len(ids) + options.max_new_tokens > self.context_length:
            raise ComneckInputError(
                f"the prompt takes {len(ids)} tokens and the answer up to {options.max_new_tokens}: more than "
                f"llama-adapter-v1's context of {self.context_length}", ErrorCode.PROMPT_TOO_LONG)

    @contextmanager
    def _visual(self, visual: torch.Tensor) -> Iterator[None]:
        """The adapted layers hold this batch's adapter keys/values while the body runs."""
        with self._lock:
            try:
                for attention in self.adapted:
                    attention.set_visual(visual)
                yield
            finally:
                for attention in self.adapted:
                    attention.set_visual(None)

    @torch.inference_mode()
    def generate(self, features: torch.Tensor, prompts: list[str], task: str, options: Sequence[GenerationOptions],
                 images: Sequence[ImageInfo] = (), choices: Sequence[Sequence[str]] = ()) -> list[BackendAnswer]:
        """``features``: projected CLIP tokens [B, 257, clip_dim]; one caption per item, with its own
        ``options``. The adapted layers hold one batch's visual tokens, so each decoding run
        (:func:`~.engines.runs`: items that decode together) is handed to the engine on its own,
        with its rows of them (the engine finds the same single run in it)."""
        visual = self.connector(features.to(self.connector.clip_proj.weight.dtype)).to(self.engine.dtype)
        prompt_ids = [self.prompt_ids(prompt) for prompt in prompts]
        outs: dict[int, Generation] = {}
        for run in runs(options):
            with self._visual(visual[run.items]):
                embeds = [self.engine.embed(prompt_ids[i]) for i in run.items]
                outs.update(zip(run.items, self.engine.generate(embeds, [options[i] for i in run.items])))
        return [BackendAnswer(outs[i].text, outs[i].details(ids)) for i, ids in enumerate(prompt_ids)]


def write_converted(adapter_file: Path, llama_folder: Path, out: Path, shard_bytes: int = 5 * 2**30) -> list[Path]:
    """``comneck convert ADAPTER.pth --llama LLAMA_DIR -o OUT``: the caption model in one folder
    (safetensors, transformers' keys, wq/wk permuted once), which the backend loads as is."""
    return AdapterCheckpoint.published(adapter_file, llama_folder).write(out, shard_bytes)
