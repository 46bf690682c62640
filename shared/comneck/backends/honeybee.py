"""Honeybee-C-7B-M144 (kakaobrain/honeybee @ 77686f0): multiple-choice and free-form VQA.

CLIP block 24's patch tokens (before ``ln_post``, class token dropped: 256 x 1024) go through
the C-Abstractor (:mod:`.c_abstractor`: 144 tokens, plus the config's eos tokens) and take the
place of the ``<image>`` run in the prompt's input embeddings; the fine-tuned Vicuna-7B then
decodes greedily, as the official SEED-Bench evaluation does.

Weights: the published Hugging Face folder (``config.json`` with ``model_type "mllm"``,
``pytorch_model*.bin`` with ``vision_model.`` / ``abstractor.`` / ``language_model.`` keys). The
vision tower's keys are not read (the gateway runs its own CLIP), and unlike the official loader
nothing is downloaded: the tokenizer (``lmsys/vicuna-7b-v1.5``'s ``tokenizer.model``, which the
checkpoint names in ``lm_config``) is read from the folder or from the ``tokenizer`` option.

Prompts are the release-era evaluation's (``tasks/base_dataset.py`` ``build_prompt``; SEED-Bench's
question with lettered options, ``tasks/seed/seed_dataset.py``), tokenised as its processor did:
BOS, then the text split only at ``<image>``, each piece through sentencepiece on its own.
"""

from __future__ import annotations

import string
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ..errors import ComneckInputError, ErrorCode
from .base import BackendAnswer, BackendContext, BackendSpec, ClipRequirement, GenerationOptions, ImageInfo
from .c_abstractor import PREFIX as ABSTRACTOR, CAbstractor, load_abstractor_state
from .engines import LLMEngine, check_context
from .hf_checkpoint import bad, iter_tensors, llama_config, llm_engine, read_config
from .sp_tokenizer import SentencePieceTokenizer, folder_clean_up

#: ``pipeline/data_utils/special_tokens.py`` SYSTEM (the evaluation leaves out SYSTEM_DETAIL).
SYSTEM = "The following is a conversation between a curious human and AI assistant."
IMAGE = "<image>"
IMAGE_SLOT = -1  # the id the official processor gives the visual positions (replaced by features)
_LANGUAGE, _VISION = "language_model.", "vision_model."
LETTERS = string.ascii_uppercase


def render(question: str, choices: Sequence[str] = ()) -> str:
    """The whole prompt: the conversation with ``question``, and with choices the SEED-Bench
    instruction and lettered options (``optionize``: "A. ...", one per line)."""
    if choices:
        options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, choices))
        question = (f"Answer with the option's letter from the given choices directly. {question}\n"
                    f"There are several options:\n{options}\n")
    return f"{SYSTEM}\nHuman: {IMAGE}\nHuman: {question}\nAI: "


def pick(answer: str, choices: Sequence[str]) -> str | None:
    """The letter the answer names, read as the official scorer reads it (``calc_seed_score``:
    the stripped, lower-cased answer equals the letter); None when it names none."""
    said = answer.strip().lower()
    return next((letter for letter in LETTERS[: len(choices)] if said == letter.lower()), None)


def clip_requirement(folder: Path) -> ClipRequirement:
    """The CLIP a Honeybee checkpoint's abstractor was trained on, from config.json's
    ``vision_config`` alone (start-up calls it before any model loads): OpenAI's CLIP-L at its
    patch and image size (the release's 224 px and 14 where the config leaves them out), under
    open_clip's name, and the tower's width where the config gives one."""
    vision = read_config(folder).get("vision_config") or {}
    if not isinstance(vision, dict):
        raise bad(folder, "config.json's vision_config is not an object")
    size, patch, width = vision.get("image_size", 224), vision.get("patch_size", 14), vision.get("hidden_size")
    if not all(isinstance(v, int) and v > 0 for v in (size, patch, width or 1)):
        raise bad(folder, f"vision_config image_size {size!r}, patch_size {patch!r}, hidden_size {width!r}: want positive integers")
    return ClipRequirement(f"ViT-L-{patch}" + ("" if size == 224 else f"-{size}"), size, width)


def read_tokenizer(folder: Path, option: str | None) -> SentencePieceTokenizer:
    """The checkpoint's own tokenizer.model, else the ``tokenizer`` option (a folder or the file).
    Answers decode as the official ``batch_decode`` did: spaces before punctuation kept or removed
    as ``clean_up_tokenization_spaces`` in the ``tokenizer_config.json`` beside the tokenizer.model
    says (Vicuna v1.5's: false, so "B ." stays "B ."), without the file LlamaTokenizer's default."""
    if option is None:
        if not (folder / "tokenizer.model").is_file():
            raise ComneckInputError(
                f"{folder} has no tokenizer.model: give Vicuna-7B v1.5's (lmsys/vicuna-7b-v1.5) with "
                f"--backend honeybee={folder},tokenizer=PATH", ErrorCode.BAD_SETTINGS)
        return SentencePieceTokenizer.from_folder(folder)
    path = Path(option)
    return SentencePieceTokenizer.from_folder(path) if path.is_dir() else SentencePieceTokenizer(path, clean_up=folder_clean_up(path.parent))


def split_tensors(folder: Path, abstractor: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """The LLM's tensors under LlamaForCausalLM's keys (``language_model.`` dropped), one at a time;
    the C-Abstractor's are put in ``abstractor`` on the way, the vision tower's skipped. A key
    under no known prefix is refused."""
    for key, tensor in iter_tensors(folder):
        if key.startswith(ABSTRACTOR):
            abstractor[key] = tensor
        elif key.startswith(_LANGUAGE):
            if not key.endswith("rotary_emb.inv_freq"):  # computed, not loaded
                yield key[len(_LANGUAGE):], tensor
        elif not key.startswith(_VISION):
            raise bad(folder, f"unexpected weight {key!r} (Honeybee keys start with {_VISION}, {ABSTRACTOR} or {_LANGUAGE})")


class Honeybee:
    """A loaded Honeybee: the C-Abstractor, the LLM behind an engine (:func:`~.hf_checkpoint.llm_engine`), and the tokenizer."""

    random_weights = False  # it loads published weights only

    def __init__(self, spec: BackendSpec, engine: LLMEngine, abstractor: CAbstractor, tokenizer: SentencePieceTokenizer,
                 num_visual_tokens: int, context_length: int) -> None:
        self.spec = spec
        self.engine = engine
        self.abstractor = abstractor
        self.tokenizer = tokenizer
        self.num_visual_tokens = num_visual_tokens
        self.context_length = context_length

    @classmethod
    def load(cls, context: BackendContext) -> "Honeybee":
        """Read the checkpoint folder onto the context's device and dtype, the LLM streamed shard by shard."""
        if context.weights is None:
            raise ComneckInputError("honeybee needs its weights: the checkpoint folder (e.g. 7B-C-Abs-M144/last)",
                                    ErrorCode.BAD_SETTINGS)
        folder = context.weights
        config = read_config(folder)
        if config.get("model_type") != "mllm" or not isinstance(config.get("text_config"), dict):
            raise bad(folder, f"config.json is not a Honeybee config (model_type {config.get('model_type')!r}, want 'mllm' "
                              "with a text_config)")
        projector_config = config.get("visual_projector_config")
        if not isinstance(projector_config, dict):
            raise bad(folder, "config.json has no visual_projector_config")
        tokenizer = read_tokenizer(folder, context.options.get("tokenizer"))
        text = config["text_config"]
        if tokenizer.vocab_size != text.get("vocab_size"):
            raise bad(folder, f"the tokenizer has {tokenizer.vocab_size} tokens, text_config says vocab_size {text.get('vocab_size')}")
        abstractor = CAbstractor.from_config(projector_config, num_query_tokens=config.get("num_query_tokens"),
                                             llm_hidden=text["hidden_size"], grid_in=context.clip_config.grid)
        if abstractor.encoder_width != context.clip_config.width:
            raise bad(folder, f"the abstractor reads width {abstractor.encoder_width}; this gateway's CLIP "
                              f"({context.clip_config.name}) has width {context.clip_config.width}")
        own: dict[str, torch.Tensor] = {}
        engine = llm_engine(llama_config(text, tokenizer, folder), split_tensors(folder, own), folder, tokenizer, context)
        if not own:
            raise bad(folder, f"no {ABSTRACTOR}* weights (the C-Abstractor)")
        load_abstractor_state(abstractor, own)
        abstractor = abstractor.to(device=context.device, dtype=context.dtype).eval()
        return cls(context.spec, engine, abstractor, tokenizer, abstractor.num_tokens,
                   int(text.get("max_position_embeddings", 2048)))

    def prompt_ids(self, prompt: str, choices: Sequence[str] = ()) -> list[int]:
        """The prompt's ids as the release-era processor makes them: BOS, then the text split only
        at ``<image>``, each piece encoded on its own, the image as ``num_visual_tokens`` slots of -1."""
        ids = [self.tokenizer.bos_token_id]
        for i, piece in enumerate(render(prompt, choices).split(IMAGE)):
            if i:
                ids += [IMAGE_SLOT] * self.num_visual_tokens
            if piece:
                ids += self.tokenizer.encode(piece, bos=False)
        return ids

    def check_prompt(self, prompt: str, task: str, options: GenerationOptions, choices: Sequence[str] = ()) -> None:
        if IMAGE in prompt:
            raise ComneckInputError(f"the prompt may not hold {IMAGE}: Honeybee places the image itself", ErrorCode.BAD_PROMPT)
        check_context("honeybee", len(self.prompt_ids(prompt, choices)), options, self.context_length)

    @torch.inference_mode()
    def generate(self, features: torch.Tensor, prompts: list[str], task: str, options: Sequence[GenerationOptions],
                 images: Sequence[ImageInfo] = (), choices: Sequence[Sequence[str]] = ()) -> list[BackendAnswer]:
        """``features``: block-24 patch tokens [B, 256, 1024]; one answer per prompt, with the letter
        picked (``details.choice``) when the item has choices."""
        visual = self.abstractor(features.to(next(self.abstractor.parameters()).dtype))
        offered = list(choices) or [()] * len(prompts)
        embeds, prompt_ids = [], []
        for tokens, prompt, item_choices in zip(visual, prompts, offered):
            ids = self.prompt_ids(prompt, item_choices)  # one run of slots: the prompt has one <image>
            embeds.append(self.engine.splice([max(i, 0) for i in ids], tokens, ids.index(IMAGE_SLOT)))
            prompt_ids.append(ids)
        answers = []
        for ids, out, item_choices in zip(prompt_ids, self.engine.generate(embeds, options), offered):
            details = out.details(ids)
            if item_choices:
                letter = pick(out.text, item_choices)
                details["choice"] = letter
                details["choice_text"] = item_choices[LETTERS.index(letter)] if letter else None
                if letter is None:
                    details["choice_note"] = f"the answer is not one of the letters A-{LETTERS[len(item_choices) - 1]}"
            answers.append(BackendAnswer(out.text, details))
        return answers
