"""Tiny checkpoints in the published layouts of the LLM backends, written by the tests.

Every parameter is random and non-zero. Shapes follow the published configs scaled down: the
vision width is the tiny CLIP's (64), the LLM is a 2-layer LLaMA of width 48, and the tokenizer
is a sentencepiece BPE model trained here on the prompts' own text, with byte fallback and
LLaMA's normaliser (identity, spaces kept as written; unk 0, bos 1, eos 2, no pad), plus the models'
added tokens.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from comneck.backends import Backend, load_backend
from comneck.backends.shikra import SYSTEM, TEMPLATES
from comneck.presets import ClipConfig

VISION_WIDTH = 64
HIDDEN, LAYERS, HEADS, INTERMEDIATE = 48, 2, 4, 96
SHIKRA_ADDED = {"<im_patch>": 0, "<im_start>": 1, "<im_end>": 2}  # offsets after the base vocabulary


def train_tokenizer(path: Path, vocab_size: int = 420, extra: tuple[str, ...] = ()) -> int:
    """Write a LLaMA-style sentencepiece model to ``path``, trained on Shikra's prompts and
    ``extra`` text; its vocabulary size."""
    import sentencepiece

    corpus = [SYSTEM, "USER: ASSISTANT: Answer: [0.120,0.031,0.586,0.975] . the cow on the left, a dog", *extra]
    corpus += [t for templates in TEMPLATES.values() for t in templates]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus * 3), model_writer=model, vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True, character_coverage=1.0, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2,  # LLaMA's normaliser
    )
    path.write_bytes(model.getvalue())
    return vocab_size


def random_nonzero(shape: tuple[int, ...], generator: torch.Generator, scale: float = 0.5) -> torch.Tensor:
    """Random values of magnitude at least 0.05 * scale, of random sign."""
    magnitude = (torch.rand(shape, generator=generator) * 0.95 + 0.05) * scale
    return torch.where(torch.rand(shape, generator=generator) < 0.5, -magnitude, magnitude)


def llama_state(vocab: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A HF ``LlamaForCausalLM`` state dict (``model.*``, ``lm_head.weight``) of the tiny size."""
    state = {"model.embed_tokens.weight": random_nonzero((vocab, HIDDEN), generator),
             "model.norm.weight": 1 + random_nonzero((HIDDEN,), generator, 0.2),
             "lm_head.weight": random_nonzero((vocab, HIDDEN), generator)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for name in ("q", "k", "v", "o"):
            state[f"{p}self_attn.{name}_proj.weight"] = random_nonzero((HIDDEN, HIDDEN), generator)
        state[f"{p}mlp.gate_proj.weight"] = random_nonzero((INTERMEDIATE, HIDDEN), generator)
        state[f"{p}mlp.up_proj.weight"] = random_nonzero((INTERMEDIATE, HIDDEN), generator)
        state[f"{p}mlp.down_proj.weight"] = random_nonzero((HIDDEN, INTERMEDIATE), generator)
        state[f"{p}input_layernorm.weight"] = 1 + random_nonzero((HIDDEN,), generator, 0.2)
        state[f"{p}post_attention_layernorm.weight"] = 1 + random_nonzero((HIDDEN,), generator, 0.2)
    return state


def write_shards(folder: Path, state: dict[str, torch.Tensor], shards: int, fmt: str) -> None:
    """``state`` as ``shards`` files with an index (or one file), the names transformers gives them."""
    keys = list(state)
    groups = [keys[i::shards] for i in range(shards)]
    if fmt == "bin":
        names = ["pytorch_model.bin"] if shards == 1 else [f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin" for i in range(shards)]
        for name, group in zip(names, groups):
            torch.save({k: state[k] for k in group}, folder / name)
        index_name = "pytorch_model.bin.index.json"
    else:
        from safetensors.torch import save_file

        names = ["model.safetensors"] if shards == 1 else [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
        for name, group in zip(names, groups):
            save_file({k: state[k].contiguous() for k in group}, str(folder / name), metadata={"format": "pt"})
        index_name = "model.safetensors.index.json"
    if shards > 1:
        index = {"metadata": {"total_size": 0}, "weight_map": {k: name for name, group in zip(names, groups) for k in group}}
        (folder / index_name).write_text(json.dumps(index))


def shikra_config(vocab: int) -> dict:
    """The published config.json's fields, at the tiny size (stale bos/eos/pad kept as published)."""
    return {
        "architectures": ["ShikraLlamaForCausalLM"], "model_type": "shikra", "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
        "vocab_size": vocab, "mm_hidden_size": VISION_WIDTH, "mm_use_im_start_end": True, "mm_vision_select_layer": -2,
        "mm_vision_tower": "openai/clip-vit-large-patch14", "use_mm_proj": True, "bos_token_id": 0, "eos_token_id": 1,
        "pad_token_id": -1, "torch_dtype": "float16", "transformers_version": "4.28.0.dev0", "hidden_act": "silu",
    }


@dataclass(frozen=True)
class ShikraFolders:
    merged: Path
    delta: Path
    base: Path


def write_shikra(root: Path, fmt: str = "bin", seed: int = 0) -> ShikraFolders:
    """A LLaMA base, the Shikra delta against it (the published layout: two shards, fp16) and the
    merged folder ``apply_delta.py`` would write from them (delta + base in fp16, the added
    tokens' rows as stored)."""
    g = torch.Generator().manual_seed(seed)
    folders = ShikraFolders(root / "shikra-merged", root / "shikra-delta", root / "llama-base")
    for folder in (folders.merged, folders.delta, folders.base):
        folder.mkdir(parents=True)
    base_vocab = train_tokenizer(folders.base / "tokenizer.model")
    vocab = base_vocab + len(SHIKRA_ADDED)
    base = {k: v.half() for k, v in llama_state(base_vocab, g).items()}
    delta = {k: v.half() for k, v in llama_state(vocab, g).items()}
    delta["model.mm_projector.weight"] = random_nonzero((HIDDEN, VISION_WIDTH), g).half()
    delta["model.mm_projector.bias"] = random_nonzero((HIDDEN,), g).half()
    merged = {}
    for key, value in delta.items():
        merged[key] = value.clone()
        if key in base:
            merged[key][: base[key].shape[0]] += base[key]
    base_config = {**{k: v for k, v in shikra_config(base_vocab).items() if not k.startswith("mm_") and k != "use_mm_proj"},
                   "architectures": ["LlamaForCausalLM"], "model_type": "llama", "bos_token_id": 1, "eos_token_id": 2}
    (folders.base / "config.json").write_text(json.dumps(base_config))
    write_shards(folders.base, base, 2, fmt)
    added = {token: base_vocab + offset for token, offset in SHIKRA_ADDED.items()}
    for folder, state in ((folders.delta, delta), (folders.merged, merged)):
        (folder / "config.json").write_text(json.dumps(shikra_config(vocab)))
        (folder / "tokenizer.model").write_bytes((folders.base / "tokenizer.model").read_bytes())
        (folder / "added_tokens.json").write_text(json.dumps(added))
        (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
        write_shards(folder, state, 2, fmt)
    return folders


HONEYBEE_PROJECTOR = {
    "projector_type": "c-abs", "hidden_size": 32, "depth": 1, "mlp_depth": 2, "num_queries": 16, "pos_emb": True,
    "feature_layer_index": -1, "num_eos_tokens": 1, "prenorm": False, "encoder_hidden_size": VISION_WIDTH,
}
HONEYBEE_CORPUS = (
    "The following is a conversation between a curious human and AI assistant.\nHuman: \nHuman: What is in the photo?\nAI: ",
    "Answer with the option's letter from the given choices directly. Which animal is it?\nThere are several options:\n"
    "A. a cow\nB. a horse\nC. a dog\nD. the beach\n\nAI: A",
)


def honeybee_config(vocab: int, projector: dict) -> dict:
    """The release-era config.json's fields (HoneybeeConfig @ 77686f0), at the tiny size."""
    return {
        "architectures": ["HoneybeeForConditionalGeneration"], "model_type": "mllm", "torch_dtype": "bfloat16",
        "transformers_version": "4.30.2", "num_query_tokens": projector.get("num_queries", 16),
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": VISION_WIDTH, "image_size": 224, "patch_size": 14,
                          "num_hidden_layers": 2, "intermediate_size": 4 * VISION_WIDTH, "num_attention_heads": 4,
                          "encoder_type": "openai.clip", "pretrained_vision_name_or_path": "openai/clip-vit-large-patch14"},
        "visual_projector_config": projector,
        "lm_config": {"pretrained_lm_name_or_path": "lmsys/vicuna-7b-v1.5", "pretrained_tokenizer_name_or_path": "lmsys/vicuna-7b-v1.5",
                      "delta_model_name_or_path": None},
        "text_config": {"model_type": "llama", "vocab_size": vocab, "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
                        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": HEADS,
                        "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "hidden_act": "silu", "bos_token_id": 1,
                        "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False, "rope_scaling": None, "pretraining_tp": 1},
    }


@dataclass(frozen=True)
class HoneybeeFolders:
    checkpoint: Path  # config.json and the weights, as save_pretrained wrote them (no tokenizer)
    tokenizer: Path  # Vicuna's tokenizer.model


def write_honeybee(root: Path, fmt: str = "bin", seed: int = 0, projector: dict | None = None,
                   tokenizer_inside: bool = False) -> HoneybeeFolders:
    """A fine-tuned Honeybee folder in the release-era layout: two bf16 shards holding the vision
    tower (``vision_model.vision_model.*``), the C-Abstractor with its 257-row positional table
    (``abstractor.*``) and the LLaMA (``language_model.*``); Vicuna's tokenizer in its own folder
    (or, with ``tokenizer_inside``, beside the weights)."""
    from comneck.backends.c_abstractor import CAbstractor

    projector = projector or HONEYBEE_PROJECTOR
    g = torch.Generator().manual_seed(seed)
    folders = HoneybeeFolders(root / "honeybee", root / "vicuna")
    for folder in (folders.checkpoint, folders.tokenizer):
        folder.mkdir(parents=True)
    vocab = train_tokenizer(folders.tokenizer / "tokenizer.model", extra=HONEYBEE_CORPUS)
    state = {f"language_model.{k}": v for k, v in llama_state(vocab, g).items()}
    shapes = CAbstractor.from_config(projector, llm_hidden=HIDDEN).state_dict()
    for key, value in shapes.items():
        shape = (1, value.shape[1] + 1, value.shape[2]) if key == "pos_emb" else tuple(value.shape)  # + the CLS row
        state[f"abstractor.{key}"] = random_nonzero(shape, g)
    tower = "vision_model.vision_model."
    state[tower + "embeddings.class_embedding"] = random_nonzero((VISION_WIDTH,), g)
    state[tower + "embeddings.patch_embedding.weight"] = random_nonzero((VISION_WIDTH, 3, 14, 14), g)
    state[tower + "post_layernorm.weight"] = 1 + random_nonzero((VISION_WIDTH,), g, 0.2)
    (folders.checkpoint / "config.json").write_text(json.dumps(honeybee_config(vocab, projector)))
    write_shards(folders.checkpoint, {k: v.bfloat16() for k, v in state.items()}, 2, fmt)
    if tokenizer_inside:
        (folders.checkpoint / "tokenizer.model").write_bytes((folders.tokenizer / "tokenizer.model").read_bytes())
    return folders


# -- LLaVA: transformers' LlavaForConditionalGeneration folders (llava-hf/llava-1.5-7b-hf's layout) --

VISION_LAYERS, VISION_HEADS = 4, 4  # the tiny CLIP's tower
LLAVA_ADDED = {"<image>": 0, "<pad>": 1}  # offsets after the base vocabulary, as llava-hf's 32000 and 32001
LLAVA_VOCAB = 448  # embedding rows: the tokenizer's 422 padded to a multiple of 64, as llava-hf's 32064
LLAVA_CONTEXT = 1024
#: Where LlamaForCausalLM's ``model.`` / ``lm_head.`` keys, the projector and the vision tower go in each layout.
LLAVA_LAYOUTS = {
    "legacy": {"model.": "language_model.model.", "lm_head.": "language_model.lm_head.",
               "projector": "multi_modal_projector.", "vision": "vision_tower."},
    "new": {"model.": "model.language_model.", "lm_head.": "lm_head.",
            "projector": "model.multi_modal_projector.", "vision": "model.vision_tower."},
}


def clip_vision_state(image_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """transformers' ``CLIPVisionModel`` keys (``vision_model.*``) at the tiny CLIP's size."""
    w, grid = VISION_WIDTH, image_size // 14
    state = {"vision_model.embeddings.class_embedding": random_nonzero((w,), generator),
             "vision_model.embeddings.patch_embedding.weight": random_nonzero((w, 3, 14, 14), generator),
             "vision_model.embeddings.position_embedding.weight": random_nonzero((grid * grid + 1, w), generator)}
    norms = ["vision_model.pre_layrnorm", "vision_model.post_layernorm"]
    for i in range(VISION_LAYERS):
        p = f"vision_model.encoder.layers.{i}."
        norms += [p + "layer_norm1", p + "layer_norm2"]
        for name in ("q", "k", "v", "out"):
            state[f"{p}self_attn.{name}_proj.weight"] = random_nonzero((w, w), generator)
            state[f"{p}self_attn.{name}_proj.bias"] = random_nonzero((w,), generator)
        state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"] = random_nonzero((4 * w, w), generator), random_nonzero((4 * w,), generator)
        state[p + "mlp.fc2.weight"], state[p + "mlp.fc2.bias"] = random_nonzero((w, 4 * w), generator), random_nonzero((w,), generator)
    for norm in norms:
        state[norm + ".weight"], state[norm + ".bias"] = 1 + random_nonzero((w,), generator, 0.2), random_nonzero((w,), generator)
    return state


def llava_config(layout: str, image_size: int, added: dict[str, int]) -> dict:
    """The published config.json at the tiny size: llava-hf's 4.36-era fields (``vocab_size`` at the
    top level as well), or a v4.52+ save's (``image_seq_length``, ``multimodal_projector_bias``)."""
    config = {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "ignore_index": -100,
        "image_token_index": added["<image>"], "pad_token_id": added["<pad>"], "projector_hidden_act": "gelu",
        "tie_word_embeddings": False, "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
        "torch_dtype": "float16",
        "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"], "model_type": "llama",
                        "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS,
                        "num_attention_heads": HEADS, "max_position_embeddings": LLAVA_CONTEXT, "rms_norm_eps": 1e-5,
                        "torch_dtype": "float16", "vocab_size": LLAVA_VOCAB},
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": VISION_WIDTH, "image_size": image_size,
                          "intermediate_size": 4 * VISION_WIDTH, "num_attention_heads": VISION_HEADS,
                          "num_hidden_layers": VISION_LAYERS, "patch_size": 14, "projection_dim": 32, "vocab_size": 32000},
    }
    if layout == "legacy":
        return {**config, "transformers_version": "4.36.0.dev0", "vocab_size": LLAVA_VOCAB}
    return {**config, "transformers_version": "4.52.0", "image_seq_length": (image_size // 14) ** 2, "multimodal_projector_bias": True}


def write_llava(root: Path, layout: str = "legacy", fmt: str = "bin", image_size: int = 224, seed: int = 0) -> Path:
    """A llava-hf folder (fp16, three shards, ``layout`` "legacy" or "new"): config.json, tokenizer.model
    with ``<image>`` and ``<pad>`` in added_tokens.json, the LLM, projector and vision tower. The
    same seed gives the same LLM and projector in every layout, format and image size."""
    folder = root / f"llava-{layout}-{fmt}-{image_size}"
    folder.mkdir(parents=True)
    base_vocab = train_tokenizer(folder / "tokenizer.model")
    added = {token: base_vocab + offset for token, offset in LLAVA_ADDED.items()}
    g = torch.Generator().manual_seed(seed)
    llm = llama_state(LLAVA_VOCAB, g)
    projector = {"linear_1.weight": random_nonzero((HIDDEN, VISION_WIDTH), g), "linear_1.bias": random_nonzero((HIDDEN,), g),
                 "linear_2.weight": random_nonzero((HIDDEN, HIDDEN), g), "linear_2.bias": random_nonzero((HIDDEN,), g)}
    names = LLAVA_LAYOUTS[layout]
    state = {names[key.split(".")[0] + "."] + key.partition(".")[2]: value for key, value in llm.items()}
    state.update({names["projector"] + key: value for key, value in projector.items()})
    state.update({names["vision"] + key: value for key, value in clip_vision_state(image_size, g).items()})
    write_shards(folder, {k: v.half() for k, v in state.items()}, 3, fmt)
    (folder / "config.json").write_text(json.dumps(llava_config(layout, image_size, added)))
    (folder / "added_tokens.json").write_text(json.dumps(added))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}))
    return folder


META_PARAMS = {"dim": HIDDEN, "multiple_of": 24, "n_heads": HEADS, "n_layers": 3, "norm_eps": 1e-6, "vocab_size": -1}
META_FFN = 144  # 24 * ceil(int(2 * 4 * 48 / 3) / 24)
ADAPTER_LEN, ADAPTER_LAYERS, ADAPTER_VISION, ADAPTER_BLOCKS = 4, 2, 32, 2  # queries, adapted layers (the last 2 of 3), width, blocks
ADAPTER_CORPUS = ("Generate caption of this image :", "a cow standing on the beach next to a dog .", "A photo of a chicken on money")


@dataclass(frozen=True)
class LlamaAdapterFiles:
    adapter: Path  # llama_adapter_len10_layer30_caption_vit_l.pth's layout
    llama: Path  # Meta's folder: params.json, consolidated.00.pth, tokenizer.model


def meta_llama_state(vocab: int, layers: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A Meta ``consolidated.00.pth`` state dict of the tiny size, ``rope.freqs`` included."""
    state = {"tok_embeddings.weight": random_nonzero((vocab, HIDDEN), generator),
             "norm.weight": 1 + random_nonzero((HIDDEN,), generator, 0.2),
             "output.weight": random_nonzero((vocab, HIDDEN), generator),
             "rope.freqs": 1.0 / 10000 ** (torch.arange(0, HIDDEN // HEADS, 2).float() / (HIDDEN // HEADS))}
    for i in range(layers):
        p = f"layers.{i}."
        for name in ("wq", "wk", "wv", "wo"):
            state[f"{p}attention.{name}.weight"] = random_nonzero((HIDDEN, HIDDEN), generator)
        state[f"{p}feed_forward.w1.weight"] = random_nonzero((META_FFN, HIDDEN), generator)
        state[f"{p}feed_forward.w2.weight"] = random_nonzero((HIDDEN, META_FFN), generator)
        state[f"{p}feed_forward.w3.weight"] = random_nonzero((META_FFN, HIDDEN), generator)
        state[f"{p}attention_norm.weight"] = 1 + random_nonzero((HIDDEN,), generator, 0.2)
        state[f"{p}ffn_norm.weight"] = 1 + random_nonzero((HIDDEN,), generator, 0.2)
    return state


def caption_adapter_state(clip_dim: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The caption adapter's keys (BACKENDS.md section 1) at the tiny size: the adaption prompts,
    a per-head ``cap_gate`` in every layer (as the official model builds them), the vision part."""
    width, layers = ADAPTER_VISION, META_PARAMS["n_layers"]

    def norm(n: int) -> dict[str, torch.Tensor]:
        return {"weight": 1 + random_nonzero((n,), generator, 0.2), "bias": random_nonzero((n,), generator, 0.2)}

    def linear(out: int, inp: int) -> dict[str, torch.Tensor]:
        return {"weight": random_nonzero((out, inp), generator), "bias": random_nonzero((out,), generator, 0.2)}

    parts = {"clip_proj": linear(width, clip_dim), "clip_proj_norm": norm(width), "visual_query": {"weight": random_nonzero((ADAPTER_LEN, width), generator)},
             "visual_proj": linear(HIDDEN, width), "visual_proj_norm": norm(HIDDEN)}
    for b in range(ADAPTER_BLOCKS):
        block = f"visual_blocks.{b}."
        parts |= {block + "norm1": norm(width), block + "attn.qkv": linear(3 * width, width), block + "attn.proj": linear(width, width),
                  block + "norm2": norm(width), block + "mlp.fc1": linear(4 * width, width), block + "mlp.fc2": linear(width, 4 * width)}
    state = {f"{module}.{name}": tensor for module, params in parts.items() for name, tensor in params.items()}
    state["cap_adapter_query.weight"] = random_nonzero((ADAPTER_LAYERS * ADAPTER_LEN, HIDDEN), generator)
    for i in range(layers):
        state[f"layers.{i}.attention.cap_gate"] = random_nonzero((1, HEADS, 1, 1), generator, 1.0)
    return state


def write_meta_llama(folder: Path, generator: torch.Generator, extra: tuple[str, ...] = ()) -> None:
    """Meta's LLaMA folder at the tiny size: params.json (vocab_size -1), fp16 consolidated.00.pth
    as released, a tokenizer trained on Shikra's prompts and ``extra``."""
    folder.mkdir(parents=True)
    vocab = train_tokenizer(folder / "tokenizer.model", extra=extra)
    (folder / "params.json").write_text(json.dumps(META_PARAMS))
    torch.save({k: v.half() for k, v in meta_llama_state(vocab, META_PARAMS["n_layers"], generator).items()}, folder / "consolidated.00.pth")


def write_llama_adapter(root: Path, clip_dim: int, seed: int = 0) -> LlamaAdapterFiles:
    """LLaMA-Adapter V1's caption files: Meta's LLaMA folder and the caption adapter ``.pth`` (float32)."""
    g = torch.Generator().manual_seed(seed)
    files = LlamaAdapterFiles(root / "llama_adapter_len10_layer30_caption_vit_l.pth", root / "llama-7b")
    write_meta_llama(files.llama, g, ADAPTER_CORPUS)
    torch.save(caption_adapter_state(clip_dim, g), files.adapter)
    return files


# -- V2L: the codebooks folder and LLaMA-2-7B in Meta's format --

#: Vocabulary strings of the tiny global codebook (subwords, bigrams as V2L's are).
V2L_WORDS = ("cow", "grass", "sky", "beach", "dog", "red", "sand", "tree", "hen", "money", " field", "blue", "water", "cat",
             "bird", "green", "sea", "wave", "coin", "barn", "hill", "ship", "road", "snow", "fish", " white", "ox", "farm")
V2L_CORPUS = ("For each of the following input output pairs, output is one of ['cow' or ['dog']",
              "###\nInput: < cowgrasssky >\nOutput: great_white_shark", "".join(V2L_WORDS))


@dataclass(frozen=True)
class V2LFiles:
    codebooks: Path  # global_codebook_embedding.pth, global_vocabulary.npy
    llama: Path  # LLaMA-2 in Meta's format


def write_v2l(root: Path, clip_dim: int, seed: int = 0) -> V2LFiles:
    """V2L's published codebook files at the tiny size (rows random, non-zero, not normalised, as
    the published means of normalised vectors are not) and a Meta-format LLaMA."""
    import numpy as np

    g = torch.Generator().manual_seed(seed)
    files = V2LFiles(root / "codebooks", root / "llama-2-7b")
    files.codebooks.mkdir(parents=True)
    torch.save(random_nonzero((len(V2L_WORDS), clip_dim), g), files.codebooks / "global_codebook_embedding.pth")
    np.save(files.codebooks / "global_vocabulary.npy", list(V2L_WORDS))
    write_meta_llama(files.llama, g, V2L_CORPUS)
    return files


def write_v2l_checkpoint(path: Path, codebook: torch.Tensor | None, seed: int = 0) -> Path:
    """``v2l-decode.pth`` at the tiny size: ``VQModel_LLaMA``'s state dict (a few of its modules,
    random and non-zero) under ``model`` when the name holds "last", else under ``state_dict`` (the
    key the official loader reads), with ``tok_embeddings_global.weight`` when ``codebook`` is given."""
    g = torch.Generator().manual_seed(seed)
    state = {"quant_conv.weight": random_nonzero((8, 4, 1, 1), g), "quant_conv.bias": random_nonzero((8,), g),
             "tok_embeddings.weight": random_nonzero((16, 8), g)}
    if codebook is not None:
        state["tok_embeddings_global.weight"] = codebook
    torch.save({"model" if "last" in path.name else "state_dict": state, "epoch": 10}, path)
    return path


def load_tiny(name: str, tiny_models, weights: Path | str, *, clip_config: ClipConfig | None = None, device: str = "cpu",
              dtype: torch.dtype = torch.float32, **options: str) -> Backend:
    """Load backend ``name`` from ``weights`` beside the tiny models' CLIP (``clip_config``: the
    preset's unless given), with ``options`` as ``--backend NAME=WEIGHTS,KEY=PATH`` gives them."""
    return load_backend(name, weights, options, clip_model=tiny_models.clip_model, clip_config=clip_config or tiny_models.preset.clip,
                        split_block=tiny_models.preset.split_block, device=device, dtype=dtype)
