"""The backends by name, and how one loads.

Like vLLM's model registry, an entry names its class as ``"module:Class"`` and is imported
only when that backend loads, so listing backends (``--help``, ``/v1/models``, start-up
checks) needs none of their packages. Add a backend: one :class:`~.base.BackendSpec` in
:data:`BACKENDS` and one module (``docs/extending.md``).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ..errors import ComneckInputError, ErrorCode
from ..presets import ClipConfig
from .base import Backend, BackendContext, BackendSpec, ClipRequirement, ClipTap

#: ``--backend`` options that choose the LLM engine (values, not paths): ``engine`` (a spec's
#: ``engines``), and for ``vllm`` the server's ``engine_url``, optionally ``engine_model`` (the
#: served model's name) and ``engine_timeout`` (seconds).
ENGINE_OPTIONS = ("engine", "engine_url", "engine_model", "engine_timeout")

BACKENDS: dict[str, BackendSpec] = {
    "clip-zero-shot": BackendSpec(
        name="clip-zero-shot",
        target="comneck.backends.clip_zero_shot:ClipZeroShot",
        description="CLIP zero-shot labeller: ranks the candidate labels listed in the prompt",
        tasks=("classify",),
        tap=ClipTap("embedding", tokens="cls"),
        example_prompt="What is in the photo? Labels: cow, horse, dog, beach, city street",
        choices=True,
    ),
    "shikra": BackendSpec(
        name="shikra",
        target="comneck.backends.shikra:Shikra",
        description="Shikra-7B: a box for a referring expression (rec), short answers (vqa) and captions, from "
        "block 23's patch tokens through LLaMA-7B",
        tasks=("rec", "vqa", "caption"),
        tap=ClipTap("hidden", block=-2, tokens="patches"),
        clip=ClipRequirement("ViT-L-14", 224),
        weight_files=("config.json", "tokenizer.model", "added_tokens.json", "pytorch_model-*.bin or model*.safetensors"),
        extra="llm",
        packages=("transformers", "sentencepiece"),
        random_init=False,
        example_prompt="the cow",
        options=("base",),
        resize="pad-square-white",
        engines=("hf", "vllm"),
    ),
    "honeybee": BackendSpec(
        name="honeybee",
        target="comneck.backends.honeybee:Honeybee",
        description="Honeybee-C-7B-M144: multiple-choice (a letter, with choices) and free-form answers (vqa), from "
        "block 24's patch tokens through the C-Abstractor and Vicuna-7B",
        tasks=("vqa",),
        tap=ClipTap("hidden", block=-1, tokens="patches"),
        clip=ClipRequirement("ViT-L-14", 224),
        clip_of_weights="comneck.backends.honeybee:clip_requirement",
        weight_files=("config.json", "pytorch_model*.bin (vision_model., abstractor., language_model.)",
                      "tokenizer.model (or tokenizer=PATH: lmsys/vicuna-7b-v1.5's)"),
        extra="llm",
        packages=("transformers", "sentencepiece", "timm"),
        random_init=False,
        example_prompt="What is in the photo?",
        options=("tokenizer",),
        resize="stretch",
        choices=True,
        engines=("hf", "vllm"),
    ),
    "llava": BackendSpec(
        name="llava",
        target="comneck.backends.llava:Llava",
        description="LLaVA-1.5 (transformers' LlavaForConditionalGeneration checkpoints): answers (vqa) and captions "
        "from block 23's patch tokens through its GELU projector and Vicuna",
        tasks=("vqa", "caption"),
        tap=ClipTap("hidden", block=-2, tokens="patches"),
        clip_of_weights="comneck.backends.llava:clip_requirement",
        weight_files=("config.json", "tokenizer.model", "added_tokens.json", "model*.safetensors or pytorch_model*.bin"),
        extra="llm",
        packages=("transformers", "sentencepiece"),
        random_init=False,
        example_prompt="What is in the photo?",
        resize="pad-square",
        engines=("hf", "vllm"),
    ),
    "llama-adapter-v1": BackendSpec(
        name="llama-adapter-v1",
        target="comneck.backends.llama_adapter:LlamaAdapterV1",
        description="LLaMA-Adapter V1 captioning: all 257 projected CLIP tokens through the caption connector, as gated "
        "adaption prompts in the last 30 layers of LLaMA-7B",
        tasks=("caption",),
        tap=ClipTap("projected", tokens="all"),
        clip=ClipRequirement("ViT-L-14", 224),
        weight_files=("llama_adapter_len10_layer30_caption_vit_l.pth with llama=LLAMA_DIR (Meta's params.json, "
                      "consolidated.00.pth, tokenizer.model)", "or a folder from comneck convert"),
        extra="llm",
        packages=("transformers", "sentencepiece", "timm"),
        random_init=False,
        example_prompt="Generate caption of this image :",
        options=("llama",),
        resize="paper",
        engines=("hf",),
        no_vllm="the image enters inside the attention layers (gated adaption prompts in the last 30), not as input embeddings",
    ),
    "v2l": BackendSpec(
        name="v2l",
        target="comneck.backends.v2l:V2L",
        description="V2L-Tokenizer few-shot classification: each image's pooled CLIP embedding as words of V2L's global "
        "codebook, an in-context episode of the labelled support for LLaMA-2-7B, 16 greedy steps under the class-name mask",
        tasks=("fewshot",),
        tap=ClipTap("embedding", tokens="cls"),
        clip=ClipRequirement("ViT-L-14", 224),
        weight_files=("codebooks/global_codebook_embedding.pth", "codebooks/global_vocabulary.npy",
                      "llama=LLaMA-2-7B in Meta's format (params.json, consolidated.00.pth, tokenizer.model)",
                      "optionally checkpoint=v2l-decode.pth (its global codebook takes precedence)"),
        extra="llm",
        packages=("transformers", "sentencepiece"),
        random_init=False,
        example_prompt="",
        options=("llama", "checkpoint"),
        resize="paper",
        engines=("hf",),
        no_vllm="its per-position class-name mask needs a logits processor that vLLM's OpenAI API cannot express",
    ),
}


def _resolve(target: str) -> Any:
    """The object a ``"module:name"`` string names, its module imported now."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def get_spec(name: str) -> BackendSpec:
    """The registered spec of ``name``, or a one-line error listing the known ones."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise ComneckInputError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}", ErrorCode.UNKNOWN_BACKEND) from None


class BackendArg(NamedTuple):
    """One ``--backend`` value: the name, its weights (None: random) and path options (``base``)."""

    name: str
    weights: Path | None = None
    options: dict[str, str] = {}


def parse_backend_arg(value: str) -> BackendArg:
    """``NAME``, ``NAME=WEIGHTS`` (a file or folder in the backend's published layout) or
    ``NAME=WEIGHTS,KEY=PATH,...`` (options the backend's spec names, e.g. a delta's ``base``, and
    the :data:`ENGINE_OPTIONS`, e.g. ``engine=vllm,engine_url=http://vllm:8000``)."""
    name, sep, rest = value.partition("=")
    name = name.strip()
    spec = get_spec(name)
    weights, *pairs = rest.split(",") if sep else [""]
    if sep and not weights.strip():
        raise ComneckInputError(f"--backend {value!r}: give the weights after '=' or drop the '='", ErrorCode.BAD_SETTINGS)
    options: dict[str, str] = {}
    for pair in pairs:
        key, eq, path = (part.strip() for part in pair.partition("="))
        if not eq or not path:
            raise ComneckInputError(f"--backend {value!r}: {pair.strip()!r} is not KEY=PATH", ErrorCode.BAD_SETTINGS)
        options[key] = path
    check_options(spec, options, f"--backend {value!r}")
    return BackendArg(name, Path(weights.strip()) if sep else None, options)


def check_options(spec: BackendSpec, options: Mapping[str, str], where: str) -> None:
    """Refuse, in one line naming ``where`` they came from, options the backend does not take:
    path options its spec does not name, and engine options (:data:`ENGINE_OPTIONS`) it cannot use."""
    unknown = [key for key in options if key not in spec.options and key not in ENGINE_OPTIONS]
    if unknown:
        known = ", ".join([*(f"{k}=PATH" for k in spec.options), *(["engine=NAME"] if spec.engines else [])]) or "none"
        raise ComneckInputError(f"{where}: {unknown[0]!r} is not an option of {spec.name} (options: {known})", ErrorCode.BAD_SETTINGS)
    if not spec.engines and any(key in options for key in ENGINE_OPTIONS):
        raise ComneckInputError(f"{where}: {spec.name} has no language model to put on an engine", ErrorCode.BAD_SETTINGS)
    engine = options.get("engine", spec.engines[0] if spec.engines else None)
    if engine is not None and engine not in spec.engines:
        why = f": {spec.no_vllm}" if engine == "vllm" and spec.no_vllm else f" (engines: {', '.join(spec.engines)})"
        raise ComneckInputError(f"{where}: {spec.name} cannot decode on engine {engine!r}{why}", ErrorCode.BAD_SETTINGS)
    remote = [key for key in ENGINE_OPTIONS[1:] if key in options]
    if engine != "vllm" and remote:
        raise ComneckInputError(f"{where}: {remote[0]} goes with engine=vllm", ErrorCode.BAD_SETTINGS)
    if engine == "vllm":
        url = options.get("engine_url", "")
        if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", url):
            raise ComneckInputError(f"{where}: engine=vllm needs engine_url=http(s)://HOST:PORT of the vLLM server (got {url!r})",
                                    ErrorCode.BAD_SETTINGS)
        timeout = options.get("engine_timeout", "1")
        if not re.fullmatch(r"\d+(\.\d*)?", timeout) or float(timeout) <= 0:
            raise ComneckInputError(f"{where}: engine_timeout {timeout!r} is not a positive number of seconds", ErrorCode.BAD_SETTINGS)


def check_packages(spec: BackendSpec) -> None:
    """Refuse, in one line, a backend whose packages are not installed."""
    missing = [pkg for pkg in spec.packages if importlib.util.find_spec(pkg) is None]
    if missing:
        hint = f"pip install 'comneck[{spec.extra}]'" if spec.extra else f"pip install {' '.join(missing)}"
        raise ComneckInputError(f"backend {spec.name} needs {', '.join(missing)}: {hint}", ErrorCode.BAD_SETTINGS)


def check_clip(spec: BackendSpec, clip: ClipConfig, split_block: int, with_weights: bool) -> None:
    """Refuse a backend the loaded CLIP cannot feed: published weights need the CLIP they were
    trained on (random ones are built at the loaded CLIP's size), and the tap must lie in the CLIP tail."""
    if with_weights and spec.clip is not None and not spec.clip.fits(clip):
        width = f", width {clip.width}" if spec.clip.width is not None else ""
        raise ComneckInputError(
            f"backend {spec.name} reads {spec.clip.describe()}; this gateway's preset runs {clip.describe()}{width}",
            ErrorCode.BAD_SETTINGS,
        )
    block = spec.tap.block_index(clip.layers)
    if block is not None and block <= split_block:
        raise ComneckInputError(
            f"backend {spec.name} reads block {block}, which the neck replaces (the CLIP tail starts at block {split_block + 1})",
            ErrorCode.BAD_TAP,
        )


def check_backend(name: str, weights: str | Path | None, clip: ClipConfig, split_block: int,
                  options: dict[str, str] | None = None) -> BackendSpec:
    """Every check that needs no loading (name, weights and option paths present, packages,
    CLIP and tap), for start-up to refuse a bad ``--backend`` in one line before any model loads.
    The spec returned carries the CLIP the weights need (``clip_of_weights`` read, where it has one)."""
    spec = get_spec(name)
    if weights is None and not spec.random_init:
        raise ComneckInputError(f"backend {name} has no random build: give its weights ({', '.join(spec.weight_files)})", ErrorCode.BAD_SETTINGS)
    paths = {key: path for key, path in (options or {}).items() if key not in ENGINE_OPTIONS}
    for what, path in [("weights", weights), *paths.items()]:
        if path is not None and not Path(path).exists():
            raise ComneckInputError(f"backend {name}: {what} {path} do not exist", ErrorCode.BAD_SETTINGS)
    check_packages(spec)
    if weights is not None and spec.clip_of_weights is not None:
        spec = replace(spec, clip=_resolve(spec.clip_of_weights)(Path(weights)))
    check_clip(spec, clip, split_block, weights is not None)
    return spec


def load_backend(
    name: str,
    weights: str | Path | None = None,
    options: dict[str, str] | None = None,
    *,
    clip_model: nn.Module,
    clip_config: ClipConfig,
    split_block: int,
    clip_random: bool = True,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Backend:
    """Check, import and load the backend ``name`` on ``device``/``dtype``; ``weights`` None builds
    it with random weights (where its spec allows) and it says so."""
    spec = check_backend(name, weights, clip_config, split_block, options)
    backend_cls = _resolve(spec.target)
    context = BackendContext(spec, Path(weights) if weights is not None else None, clip_model, clip_config, clip_random,
                             torch.device(device), dtype, dict(options or {}))
    return backend_cls.load(context)
