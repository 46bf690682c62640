"""Shikra-7B (shikras/shikra @ ff79a4ce): referring expressions -> boxes, through patch tokens.

CLIP block 23's patch tokens (class token dropped: 256 x 1024) go through ``mm_projector`` (one
Linear to LLaMA's width) and replace the ``<im_patch>`` embeddings between ``<im_start>`` and
``<im_end>`` in the prompt's input embeddings; LLaMA-7B then decodes greedily (the official eval).

Weights, in the published layouts:

* a merged folder: what the official ``apply_delta.py`` writes, or ``comneck convert``;
* the published delta folder ``shikra-7b-delta-v1`` with a LLaMA-7B base in Hugging Face format,
  added the official way (:func:`merged_tensors`).

Prompts: the request's text goes into one of Shikra's own task templates (``<expr>`` for
``rec``, ``<question>`` for ``vqa``; ``caption`` templates take no text), selected by
``options.template`` (default 0), inside the ``vicuna_v1.1`` conversation. Boxes in the answer
are read as the official REC metric reads them (:func:`parse_boxes`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ComneckInputError, ErrorCode
from ..image import frame_to_photo
from .base import BackendAnswer, BackendContext, BackendSpec, GenerationOptions, ImageInfo
from .engines import LLMEngine, check_context
from .hf_checkpoint import LazyTensors, bad, iter_tensors, llama_config, llm_engine, read_config, write_safetensors
from .sp_tokenizer import SentencePieceTokenizer

IM_PATCH, IM_START, IM_END = "<im_patch>", "<im_start>", "<im_end>"
#: The ``vicuna_v1.1`` conversation (mllm/conversation/base_conversation.py), as the eval renders it.
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
#: Shikra's task templates (config/_base_/dataset/template/{REC,VQA,image_cap}.json), verbatim.
TEMPLATES: dict[str, list[str]] = {
    task: items for task, items in json.loads(resources.files(__package__).joinpath("shikra_templates.json").read_text()).items()
    if task in ("rec", "vqa", "caption")
}
_PLACEHOLDER = {"rec": "<expr>", "vqa": "<question>", "caption": None}
#: PlainBoxFormatter's pattern: ``[x0,y0,x1,y1]``, several boxes joined by ``;``, values in [0, 1].
_BOXES = re.compile(r"\[\d(?:\.\d*)?(?:,\d(?:\.\d*)?){3}(?:;\d(?:\.\d*)?(?:,\d(?:\.\d*)?){3})*\]")
_PROJECTOR_PREFIX = "model.mm_projector."
_PROJECTOR_KEYS = {_PROJECTOR_PREFIX + "weight", _PROJECTOR_PREFIX + "bias"}


def render(task: str, text: str, template: int) -> str:
    """The user turn: ``text`` in template ``template`` of ``task`` (``<image>`` left in place)."""
    templates = TEMPLATES[task]
    if not 0 <= template < len(templates):
        raise ComneckInputError(f"shikra has {len(templates)} {task} templates (0..{len(templates) - 1}); got {template}",
                                ErrorCode.UNKNOWN_TEMPLATE)
    placeholder = _PLACEHOLDER[task]
    question = templates[template]
    if placeholder is not None:
        if not text.strip():
            what = "referring expression" if task == "rec" else "question"
            raise ComneckInputError(f"shikra's {task} task needs a {what} in the prompt", ErrorCode.BAD_PROMPT)
        question = question.replace(placeholder, text.strip())
    return f"{SYSTEM} USER: {question} ASSISTANT:"


def parse_boxes(text: str) -> list[list[list[float]]]:
    """Every ``[...]`` box group in ``text``, each a list of [x0, y0, x1, y1] (normalised)."""
    return [[[float(v) for v in box.split(",")] for box in group[1:-1].split(";")] for group in _BOXES.findall(text)]


@dataclass(frozen=True)
class ShikraWeights:
    """Where a Shikra checkpoint is: a merged folder, or a delta folder plus its LLaMA base."""

    folder: Path
    base: Path | None = None

    @property
    def config(self) -> dict[str, Any]:
        config = read_config(self.folder)
        if "mm_hidden_size" not in config or "hidden_size" not in config:
            raise bad(self.folder, "config.json is not a Shikra config (no mm_hidden_size / hidden_size)")
        return config


def merged_tensors(weights: ShikraWeights) -> Iterator[tuple[str, torch.Tensor]]:
    """The merged checkpoint's tensors, one at a time. A delta is added to its base as
    ``apply_delta.py`` does: in the delta's dtype; the embedding and output matrices only on
    their first (base vocabulary) rows, so the added tokens' rows stay as stored; the projector
    (absent from the base) as is. Rotary tables some saves carry are skipped (they are computed)."""
    base = LazyTensors(weights.base) if weights.base is not None else None
    for key, tensor in iter_tensors(weights.folder):
        if key.endswith("rotary_emb.inv_freq"):
            continue
        if base is None or key.startswith(_PROJECTOR_PREFIX):
            yield key, tensor
            continue
        if key not in base:
            raise bad(base.folder, f"the base has no {key!r} to add the delta to")
        add = base[key].to(tensor.dtype)
        if add.shape == tensor.shape:
            yield key, tensor + add
        elif add.ndim == 2 and add.shape[1] == tensor.shape[1] and add.shape[0] < tensor.shape[0]:
            merged = tensor.clone()
            merged[: add.shape[0]] += add
            yield key, merged
        else:
            raise bad(base.folder, f"base {key!r} {list(add.shape)} does not fit the delta's {list(tensor.shape)}")


def split_projector(tensors: Iterable[tuple[str, torch.Tensor]], projector: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """The LLaMA's tensors of a merged stream, one at a time; ``mm_projector``'s weight and bias are
    put in ``projector`` on the way (any other key, expected or not, is the LLaMA's to check)."""
    for key, tensor in tensors:
        if key in _PROJECTOR_KEYS:
            projector[key] = tensor
        else:
            yield key, tensor


def write_merged(weights: ShikraWeights, out: Path, shard_bytes: int = 5 * 2**30) -> list[Path]:
    """``comneck convert``: the merged checkpoint as the official merge leaves it (Shikra's
    config.json and tokenizer files, the merged tensors) in safetensors shards of at most
    ``shard_bytes`` with an index, so start-up reads it instead of adding the delta again.
    Holds one shard in memory."""
    files = write_safetensors(merged_tensors(weights), out, shard_bytes)
    (out / "config.json").write_text(json.dumps(weights.config, indent=2))
    for name in ("tokenizer.model", "added_tokens.json", "special_tokens_map.json", "tokenizer_config.json", "generation_config.json"):
        if (weights.folder / name).is_file():
            (out / name).write_bytes((weights.folder / name).read_bytes())
    return files


class Shikra:
    """A loaded Shikra: LLaMA behind an engine (:func:`~.hf_checkpoint.llm_engine`), ``mm_projector`` and the tokenizer."""

    random_weights = False  # it loads published weights only

    def __init__(self, spec: BackendSpec, engine: LLMEngine, projector: nn.Linear, tokenizer: SentencePieceTokenizer,
                 num_patches: int, context_length: int) -> None:
        self.spec = spec
        self.engine = engine
        self.projector = projector
        self.tokenizer = tokenizer
        self.num_patches = num_patches
        self.context_length = context_length
        self.patch_id, self.start_id, self.end_id = (tokenizer.token_id(t) for t in (IM_PATCH, IM_START, IM_END))

    @classmethod
    def load(cls, context: BackendContext) -> "Shikra":
        """Read the checkpoint (merged, or delta + ``base`` option) onto the context's device and dtype."""
        if context.weights is None:
            raise ComneckInputError("shikra needs its weights: a merged folder, or the delta folder with base=LLAMA_FOLDER",
                                    ErrorCode.BAD_SETTINGS)
        base = context.options.get("base")
        weights = ShikraWeights(context.weights, Path(base) if base else None)
        config = weights.config
        tokenizer = SentencePieceTokenizer.from_folder(weights.folder, clean_up=True)  # the official decode asks for the clean-up
        if tokenizer.vocab_size != config["vocab_size"]:
            raise bad(weights.folder, f"the tokenizer has {tokenizer.vocab_size} tokens, config.json says vocab_size {config['vocab_size']}")
        width = context.clip_config.width
        if config["mm_hidden_size"] != width:
            raise bad(weights.folder, f"mm_hidden_size {config['mm_hidden_size']} is not the width {width} of this gateway's CLIP "
                                      f"({context.clip_config.name}): another vision tower")
        projector: dict[str, torch.Tensor] = {}
        engine = llm_engine(llama_config(config, tokenizer, weights.folder), split_projector(merged_tensors(weights), projector),
                            weights.folder, tokenizer, context)
        if set(projector) != _PROJECTOR_KEYS:
            raise bad(weights.folder, f"missing {sorted(_PROJECTOR_KEYS - set(projector))[0]!r} (the vision projector)")
        linear = nn.Linear(config["mm_hidden_size"], config["hidden_size"], device=context.device, dtype=context.dtype)
        with torch.no_grad():
            linear.weight.copy_(projector[_PROJECTOR_PREFIX + "weight"])
            linear.bias.copy_(projector[_PROJECTOR_PREFIX + "bias"])
        return cls(context.spec, engine, linear.eval(), tokenizer, context.clip_config.grid**2,
                   int(config.get("max_position_embeddings", 2048)))

    def prompt_ids(self, prompt: str, task: str, template: int | None) -> list[int]:
        """The token ids of the whole prompt, ``<image>`` expanded to ``<im_start>``, the patch
        tokens and ``<im_end>``, as ShikraConvProcess and the slow tokenizer make them."""
        image = IM_START + IM_PATCH * self.num_patches + IM_END
        return self.tokenizer.encode(render(task, prompt, template or 0).replace("<image>", image))

    def check_prompt(self, prompt: str, task: str, options: GenerationOptions, choices: Sequence[str] = ()) -> None:
        check_context("shikra", len(self.prompt_ids(prompt, task, options.template)), options, self.context_length)

    @torch.inference_mode()
    def generate(self, features: torch.Tensor, prompts: list[str], task: str, options: Sequence[GenerationOptions],
                 images: Sequence[ImageInfo] = (), choices: Sequence[Sequence[str]] = ()) -> list[BackendAnswer]:
        """``features``: block-23 patch tokens [B, 256, 1024]; one answer (and box) per prompt,
        each in the template its ``options`` name. A box is also given in the photo's pixels when
        ``images`` say how the photo was framed. Shikra takes no ``choices`` (its spec says so;
        the pipeline refuses them)."""
        visual = self.projector(features.to(self.projector.weight.dtype))
        embeds, prompt_ids = [], []
        for tokens, prompt, item in zip(visual, prompts, options):
            ids = self.prompt_ids(prompt, task, item.template)
            start = ids.index(self.start_id)
            if ids[start + 1 + self.num_patches] != self.end_id:
                raise RuntimeError("the image tokens are not <im_start> + patches + <im_end>")
            embeds.append(self.engine.splice(ids, tokens, start + 1))
            prompt_ids.append(ids)
        answers = []
        frames = list(images) or [None] * len(prompts)
        for ids, out, image, item in zip(prompt_ids, self.engine.generate(embeds, options), frames, options):
            details = {**out.details(ids), "template": item.template or 0}
            if task == "rec":
                groups = parse_boxes(out.text)
                one = len(groups) == 1 and len(groups[0]) == 1
                details["box"] = groups[0][0] if one else None
                if not one:
                    details["box_note"] = f"the answer holds {sum(map(len, groups))} boxes; REC reads exactly one"
                elif image is not None and image.source is not None and image.size[0] == image.size[1]:
                    details["box_pixels"] = [round(v, 1) for v in frame_to_photo(details["box"], image.source.size,
                                                                                     image.source.resize, image.size[0])]
            answers.append(BackendAnswer(out.text, details))
        return answers
