"""LLaVA-1.5 from Hugging Face checkpoints (transformers' ``LlavaForConditionalGeneration``, e.g.
``llava-hf/llava-1.5-7b-hf``): answers and captions from CLIP block 23's patch tokens.

The checkpoint's ``config.json`` says which CLIP its projector was trained on (``vision_config``:
336 px for LLaVA-1.5, 224 px for some variants); :func:`clip_requirement` reads it, so start-up
refuses a gateway preset that runs another. Block 23's patch tokens (``vision_feature_layer``
-2, strategy ``default``: class token dropped; 576 x 1024 at 336 px) go through
``multi_modal_projector`` (linear_1, GELU, linear_2) and take the places of the image tokens
``<image>`` expands into, in the prompt's input embeddings, as transformers' model scatters
them; LLaMA (Vicuna) decodes from those embeddings. The folder's vision tower is not read: the
gateway runs its own CLIP.

Weights come in either of transformers' key layouts: the one saves before v4.52 wrote
(``language_model.model.*``, ``language_model.lm_head.*``, ``multi_modal_projector.*``,
``vision_tower.*``) and the current one (``model.language_model.*``, ``lm_head.*``,
``model.multi_modal_projector.*``, ``model.vision_tower.*``), in safetensors or ``.bin`` shards.

Prompt: the model card's ``USER: <image>\\n{prompt} ASSISTANT:`` for both tasks, the request's
text being the instruction (for a caption, LLaVA-1.5's own: "Provide a one-sentence caption for
the provided image."); decoding is greedy unless ``options`` ask for sampling.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ComneckInputError, ErrorCode
from .base import BackendAnswer, BackendContext, BackendSpec, ClipRequirement, GenerationOptions, ImageInfo
from .engines import LLMEngine, check_context
from .hf_checkpoint import bad, iter_tensors, llama_config, llm_engine, load_streamed, read_config
from .sp_tokenizer import SentencePieceTokenizer

IMAGE = "<image>"
#: The prompt around the image tokens (the model card's; LLaVA-1.5's ``vicuna_v1`` turn without a system line).
BEFORE_IMAGE, AFTER_IMAGE = "USER: ", "\n{prompt} ASSISTANT:"
#: Key prefixes of both layouts -> (part, prefix in that part): ``llm`` keys become
#: LlamaForCausalLM's, ``projector`` keys :class:`Projector`'s; ``vision`` keys are skipped.
_PREFIXES = (
    ("language_model.model.", "llm", "model."), ("model.language_model.", "llm", "model."),
    ("language_model.lm_head.", "llm", "lm_head."), ("lm_head.", "llm", "lm_head."),
    ("multi_modal_projector.", "projector", ""), ("model.multi_modal_projector.", "projector", ""),
    ("vision_tower.", "vision", ""), ("model.vision_tower.", "vision", ""),
)


@dataclass(frozen=True)
class CheckpointConfig:
    """The fields of a llava ``config.json`` this backend reads, checked.

    * ``text``: ``text_config`` (LLaMA fields; published ones list a few and leave the rest to
      LlamaConfig's defaults), with ``vocab_size`` from the top level when only older saves put it there;
    * ``image_size``, ``patch_size``, ``vision_width``: the CLIP tower of ``vision_config``;
    * ``image_token``: ``image_token_index``; ``projector_bias``: ``multimodal_projector_bias``.
    """

    text: dict[str, Any]
    image_size: int
    patch_size: int
    vision_width: int
    image_token: int
    projector_bias: bool

    @classmethod
    def read(cls, folder: Path) -> "CheckpointConfig":
        """Read and check ``folder/config.json``; what this backend cannot serve is refused in one line."""
        config = read_config(folder)
        if config.get("model_type") != "llava":
            raise bad(folder, f"config.json is not a llava config (model_type {config.get('model_type')!r})")
        text = dict(config.get("text_config") or {})
        if text.get("model_type", "llama") != "llama":
            raise bad(folder, f"the language model is {text['model_type']!r}; this backend runs LLaMA (LLaVA-1.5's Vicuna)")
        if "vocab_size" not in text and "vocab_size" in config:
            text["vocab_size"] = config["vocab_size"]
        vision = config.get("vision_config") or {}
        if vision.get("model_type", "clip_vision_model") != "clip_vision_model":
            raise bad(folder, f"the vision tower is a {vision['model_type']!r}; the gateway runs OpenAI CLIP")
        missing = [k for k in ("image_size", "patch_size", "hidden_size") if k not in vision]
        if missing:
            raise bad(folder, f"vision_config has no {missing[0]}")
        served = {"vision_feature_layer": (config.get("vision_feature_layer", -2), -2),
                  "vision_feature_select_strategy": (config.get("vision_feature_select_strategy", "default"), "default"),
                  "projector_hidden_act": (config.get("projector_hidden_act", "gelu"), "gelu")}
        for field, (value, supported) in served.items():
            if value != supported:
                raise bad(folder, f"{field} {value!r} is not served, only {supported!r} (the gateway's tap gives block "
                                  "23's patch tokens, class token dropped, to a GELU projector)")
        return cls(text, int(vision["image_size"]), int(vision["patch_size"]), int(vision["hidden_size"]),
                   int(config.get("image_token_index", 32000)), bool(config.get("multimodal_projector_bias", True)))


def clip_requirement(folder: Path) -> ClipRequirement:
    """The CLIP a llava checkpoint's projector was trained on, from its config.json alone (start-up
    calls it before any model loads): OpenAI's CLIP-L at the tower's patch and image size, under
    open_clip's name (``ViT-L-14``, ``ViT-L-14-336``), and the tower's width."""
    config = CheckpointConfig.read(folder)
    size = "" if config.image_size == 224 else f"-{config.image_size}"
    return ClipRequirement(f"ViT-L-{config.patch_size}{size}", config.image_size, config.vision_width)


class Projector(nn.Module):
    """``multi_modal_projector``: linear_1 (CLIP width -> LLM width), GELU, linear_2 (LLM width)."""

    def __init__(self, vision_width: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(vision_width, hidden, bias=bias)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(hidden, hidden, bias=bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


def split_tensors(folder: Path, projector: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """The LLM's tensors under LlamaForCausalLM's keys, one at a time, from either layout; the
    projector's are put in ``projector`` on the way, the vision tower's skipped. A key under no
    known prefix is refused."""
    for key, tensor in iter_tensors(folder):
        part, name = next(((part, new + key[len(old):]) for old, part, new in _PREFIXES if key.startswith(old)), (None, key))
        if part == "llm":
            yield name, tensor
        elif part == "projector":
            projector[name] = tensor
        elif part is None:
            raise bad(folder, f"unexpected weight {key!r} (neither layout's language_model, multi_modal_projector or vision_tower)")


@dataclass(eq=False)
class Llava:
    """A loaded LLaVA: LLaMA behind an engine (:func:`~.hf_checkpoint.llm_engine`), the projector
    and the tokenizer; the prompt's ``<image>`` becomes ``num_patches`` copies of ``image_token``.
    ``context_length``: prompt and answer tokens the LLM takes (its ``max_position_embeddings``)."""

    spec: BackendSpec
    engine: LLMEngine
    projector: Projector
    tokenizer: SentencePieceTokenizer
    image_token: int
    num_patches: int
    context_length: int
    random_weights = False  # it loads published weights only

    @classmethod
    def load(cls, context: BackendContext) -> "Llava":
        """Read the checkpoint folder onto the context's device and dtype (its CLIP was checked at start-up)."""
        if context.weights is None:
            raise ComneckInputError("llava needs its weights: a llava-hf checkpoint folder", ErrorCode.BAD_SETTINGS)
        folder = context.weights
        config = CheckpointConfig.read(folder)
        tokenizer = SentencePieceTokenizer.from_folder(folder)
        llama = llama_config(config.text, tokenizer, folder)
        if tokenizer.vocab_size > llama.vocab_size:
            raise bad(folder, f"the tokenizer has {tokenizer.vocab_size} tokens, more than the {llama.vocab_size} rows of the "
                              "embedding matrix (text_config vocab_size)")
        if tokenizer.added.get(IMAGE) != config.image_token:
            raise bad(folder, f"image_token_index {config.image_token} is not the tokenizer's {IMAGE} "
                              f"({tokenizer.added.get(IMAGE, 'absent')})")
        projector_tensors: dict[str, torch.Tensor] = {}
        engine = llm_engine(llama, split_tensors(folder, projector_tensors), folder, tokenizer, context)
        with torch.device("meta"):
            projector = Projector(config.vision_width, llama.hidden_size, config.projector_bias)
        load_streamed(projector, projector_tensors.items(), folder, context.dtype, context.device)
        return cls(context.spec, engine, projector.eval(), tokenizer, config.image_token, context.clip_config.grid**2,
                   int(llama.max_position_embeddings))

    def prompt_ids(self, prompt: str) -> list[int]:
        """BOS, ``USER: ``, the image tokens, ``\\n{prompt} ASSISTANT:``: each side of the image
        through sentencepiece on its own (its dummy-prefix space first), the spaces beside the
        image kept, as llava-hf's tokenizer makes them (``USER: <image>\\nWhat`` -> 1, 3148, 1001,
        29901, 29871, 32000, 29871, 13, 5618 in vLLM's llava.py). A literal ``<image>`` in the
        request's text stays text."""
        sp = self.tokenizer.sp
        return [self.tokenizer.bos_token_id, *sp.EncodeAsIds(BEFORE_IMAGE), *[self.image_token] * self.num_patches,
                *sp.EncodeAsIds(AFTER_IMAGE.format(prompt=prompt.strip()))]

    def check_prompt(self, prompt: str, task: str, options: GenerationOptions, choices: Sequence[str] = ()) -> None:
        check_context("llava", len(self.prompt_ids(prompt)), options, self.context_length)

    @torch.inference_mode()
    def generate(self, features: torch.Tensor, prompts: list[str], task: str, options: Sequence[GenerationOptions],
                 images: Sequence[ImageInfo] = (), choices: Sequence[Sequence[str]] = ()) -> list[BackendAnswer]:
        """``features``: block-23 patch tokens [B, grid², width]; one answer per prompt."""
        visual = self.projector(features.to(self.projector.linear_1.weight.dtype))
        prompt_ids = [self.prompt_ids(prompt) for prompt in prompts]
        embeds = [self.engine.splice(ids, tokens, ids.index(self.image_token)) for ids, tokens in zip(prompt_ids, visual)]
        return [BackendAnswer(out.text, out.details(ids)) for ids, out in zip(prompt_ids, self.engine.generate(embeds, options))]
