"""LLaMA-Adapter V1 captioning on tiny checkpoints in the published layouts (Meta's LLaMA folder,
the caption adapter .pth), against a reference forward written here from the published equations."""

from __future__ import annotations

import json
import math
import shutil
from functools import partial

import pytest
import torch
from checkpoints import ADAPTER_CORPUS, ADAPTER_LAYERS, ADAPTER_LEN, HEADS, HIDDEN, META_PARAMS, load_tiny, train_tokenizer, write_llama_adapter
from references import MIXED_OPTIONS, assert_batch_equals_singles

from comneck.backends import GenerationOptions, check_backend
from comneck.backends.llama_adapter import PROMPT, write_converted
from comneck.backends.meta_checkpoint import ffn_hidden, to_hf_rotary
from comneck.errors import ComneckInputError
from comneck.presets import get_preset

TOKENS = 257  # CLS + 16 x 16 patches
STEPS = 6
PROMPTS = ["", "a cow standing on the beach", "Generate caption of this image : A photo of"]


@pytest.fixture(scope="module")
def clip_dim(tiny_models):
    return int(tiny_models.preset.clip.model_cfg["embed_dim"])


@pytest.fixture(scope="module")
def files(tmp_path_factory, clip_dim):
    return write_llama_adapter(tmp_path_factory.mktemp("llama-adapter"), clip_dim)


load = partial(load_tiny, "llama-adapter-v1")


@pytest.fixture(scope="module")
def adapter(tiny_models, files):
    return load(tiny_models, files.adapter, llama=str(files.llama))


# -- the reference: the published equations in float64 on the files' own tensors ----------------

def read_files(files) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    llama = {k: v.double() for k, v in torch.load(files.llama / "consolidated.00.pth", weights_only=True).items()}
    caption = {k: v.double() for k, v in torch.load(files.adapter, weights_only=True).items()}
    return llama, caption


def layer_norm(x, s, prefix, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * s[prefix + ".weight"] + s[prefix + ".bias"]


def linear(x, s, prefix):
    return x @ s[prefix + ".weight"].T + s[prefix + ".bias"]


def reference_connector(features: torch.Tensor, s: dict[str, torch.Tensor]) -> torch.Tensor:
    """VisionModel.forward without CLIP: clip_proj + LN, queries first, two pre-norm ViT blocks
    (16 heads, exact GELU), the query outputs through visual_proj + LN. [T, clip_dim] -> [len, hidden]."""
    x = layer_norm(linear(features.double(), s, "clip_proj"), s, "clip_proj_norm")
    x = torch.cat([s["visual_query.weight"], x])
    for b in range(2):
        p = f"visual_blocks.{b}."
        h = layer_norm(x, s, p + "norm1")
        q, k, v = linear(h, s, p + "attn.qkv").view(len(x), 3, 16, -1).permute(1, 2, 0, 3)  # [heads, T, d] each
        attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), -1) @ v
        x = x + linear(attn.transpose(0, 1).reshape(len(x), -1), s, p + "attn.proj")
        h = linear(layer_norm(x, s, p + "norm2"), s, p + "mlp.fc1")
        x = x + linear(0.5 * h * (1 + torch.erf(h / math.sqrt(2))), s, p + "mlp.fc2")
    return layer_norm(linear(x[:ADAPTER_LEN], s, "visual_proj"), s, "visual_proj_norm")


def rms_norm(x, weight, eps=META_PARAMS["norm_eps"]):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def meta_rope(x: torch.Tensor) -> torch.Tensor:
    """Meta's rotary embedding: each head's channels as complex pairs (0, 1), (2, 3), ... times
    e^(i t theta_j), theta_j = 10000^(-2j/d). x: [T, heads, d]."""
    t, d = x.shape[0], x.shape[-1]
    angles = torch.outer(torch.arange(t, dtype=torch.float64), 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d))
    pairs = torch.view_as_complex(x.reshape(t, x.shape[1], d // 2, 2).contiguous())
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)[:, None]).reshape(x.shape)


def reference_logits(llama, caption, ids: list[int], visual: torch.Tensor | None) -> torch.Tensor:
    """Meta's Transformer.forward_caption on the un-permuted Meta weights, the whole sequence at
    once: logits [T, vocab]. The last ADAPTER_LAYERS layers add tanh(cap_gate) * softmax(q k_a^T / sqrt(d)) v_a;
    with ``caption`` None, Meta's plain Transformer.forward (LLaMA-2's, for V2L)."""
    n, d = len(ids), HIDDEN // HEADS
    h = llama["tok_embeddings.weight"][ids]
    causal = torch.full((n, n), float("-inf"), dtype=torch.float64).triu(1)
    first = META_PARAMS["n_layers"] - ADAPTER_LAYERS if caption is not None else META_PARAMS["n_layers"]
    for i in range(META_PARAMS["n_layers"]):
        p = f"layers.{i}."
        x = rms_norm(h, llama[p + "attention_norm.weight"])
        q, k, v = (x @ llama[f"{p}attention.{w}.weight"].T for w in ("wq", "wk", "wv"))
        q, k = meta_rope(q.view(n, HEADS, d)), meta_rope(k.view(n, HEADS, d))
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.view(n, HEADS, d).transpose(0, 1)  # [heads, T, d]
        out = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d) + causal, -1) @ v
        if i >= first:
            prompt = caption["cap_adapter_query.weight"].view(ADAPTER_LAYERS, ADAPTER_LEN, HIDDEN)[i - first] + visual
            ak = (prompt @ llama[p + "attention.wk.weight"].T).view(ADAPTER_LEN, HEADS, d).transpose(0, 1)
            av = (prompt @ llama[p + "attention.wv.weight"].T).view(ADAPTER_LEN, HEADS, d).transpose(0, 1)
            gate = torch.tanh(caption[p + "attention.cap_gate"]).view(HEADS, 1, 1)
            out = out + gate * torch.softmax(q @ ak.transpose(1, 2) / math.sqrt(d), -1) @ av
        h = h + out.transpose(0, 1).reshape(n, HIDDEN) @ llama[p + "attention.wo.weight"].T
        x = rms_norm(h, llama[p + "ffn_norm.weight"])
        gate_up = torch.nn.functional.silu(x @ llama[p + "feed_forward.w1.weight"].T) * (x @ llama[p + "feed_forward.w3.weight"].T)
        h = h + gate_up @ llama[p + "feed_forward.w2.weight"].T
    return rms_norm(h, llama["norm.weight"]) @ llama["output.weight"].T


def reference_ids(files, prompt: str) -> list[int]:
    """Meta's Tokenizer.encode(prompt, bos=True, eos=False)."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(files.llama / "tokenizer.model"))
    return [sp.bos_id(), *sp.encode(prompt)]


# -- tests ----------------------------------------------------------------------------------------

def test_the_ffn_width_and_the_rotary_permutation_follow_meta(files):
    assert ffn_hidden(4096, 256) == 11008 and ffn_hidden(HIDDEN, 24) == 144  # LLaMA-7B's and the tiny one
    assert ffn_hidden(8192, 4096, 1.3) == 28672  # LLaMA-2-70B's params.json
    # transformers' rotary (halves) on the permuted weight's output equals Meta's (pairs) on the original's, channels permuted alike
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(HIDDEN, HIDDEN, generator=g, dtype=torch.float64), torch.randn(5, HIDDEN, generator=g, dtype=torch.float64)
    d = HIDDEN // HEADS
    order = to_hf_rotary(torch.arange(HIDDEN).view(HIDDEN, 1), HEADS)[:, 0]  # which Meta channel each HF channel is
    assert order[:d].tolist() == [*range(0, d, 2), *range(1, d, 2)]
    config = LlamaConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, num_hidden_layers=1, vocab_size=8)
    cos, sin = LlamaRotaryEmbedding(config)(x[None], torch.arange(5)[None])
    hf = (x @ to_hf_rotary(w, HEADS).T).view(1, 5, HEADS, d).transpose(1, 2)
    hf, _ = apply_rotary_pos_emb(hf, hf, cos.double(), sin.double())
    meta = meta_rope((x @ w.T).view(5, HEADS, d)).reshape(5, HIDDEN)[:, order]
    torch.testing.assert_close(meta.view(5, HEADS, d).transpose(0, 1), hf[0], atol=1e-5, rtol=1e-6)  # float32 cos/sin


def test_the_prompt_is_the_official_caption_instruction_with_bos(adapter, files):
    assert PROMPT == "Generate caption of this image :"
    assert adapter.prompt_ids("") == adapter.prompt_ids("  ") == reference_ids(files, PROMPT)
    assert adapter.prompt_ids("a cow") == reference_ids(files, "a cow")  # a request's own instruction takes its place


def test_connector_first_step_logits_and_greedy_ids_equal_the_reference(adapter, files):
    llama, caption = read_files(files)
    g = torch.Generator().manual_seed(3)
    features = torch.randn(3, TOKENS, adapter.connector.clip_dim, generator=g)
    visual = torch.stack([reference_connector(f, caption) for f in features])
    torch.testing.assert_close(adapter.connector(features).double(), visual, atol=1e-5, rtol=0)
    options = GenerationOptions(max_new_tokens=STEPS, logprobs=5)
    answers = adapter.generate(features, PROMPTS, "caption", [options] * len(features))
    eos = adapter.tokenizer.eos_token_id
    for i, (prompt, answer) in enumerate(zip(PROMPTS, answers)):
        ids = reference_ids(files, prompt or PROMPT)
        assert answer.details["prompt_token_ids"] == ids
        first = torch.log_softmax(reference_logits(llama, caption, ids, visual[i])[-1], -1)
        top = answer.details["logprobs"][0]["top_logprobs"]
        assert [t["token_id"] for t in top] == first.topk(5).indices.tolist()
        torch.testing.assert_close(torch.tensor([t["logprob"] for t in top], dtype=torch.float64), first.topk(5).values, atol=1e-5, rtol=0)
        out, seq = [], list(ids)
        for _ in range(STEPS):
            token = int(reference_logits(llama, caption, seq, visual[i])[-1].argmax())
            if token == eos:
                break
            out.append(token)
            seq.append(token)
        assert answer.details["token_ids"] == out
        assert answer.text == adapter.tokenizer.sp.decode(out)  # Meta's decode, no clean-up of spaces
    for i in range(3):  # a batch of three (left-padded: the prompts differ in length) equals three single calls
        (single,) = adapter.generate(features[i : i + 1], PROMPTS[i : i + 1], "caption", [options])
        assert single.details["token_ids"] == answers[i].details["token_ids"]


def test_a_batch_of_mixed_options_equals_its_items_alone(adapter):
    """Items that decode in separate runs (greedy ones together, the seeded one alone) each get
    their own rows of the adapter's visual tokens."""
    features = torch.randn(3, TOKENS, adapter.connector.clip_dim, generator=torch.Generator().manual_seed(8))
    answers = assert_batch_equals_singles(lambda s: adapter.generate(features[s], PROMPTS[s], "caption", MIXED_OPTIONS[s]), 3)
    for item, answer in zip(MIXED_OPTIONS, answers):
        assert len(answer.details["token_ids"]) <= item.max_new_tokens and ("logprobs" in answer.details) is bool(item.logprobs)


def test_the_gates_matter(adapter, files):
    """With every cap_gate zero the adapter adds nothing: the logits are LLaMA's alone, another answer."""
    llama, caption = read_files(files)
    ids = reference_ids(files, PROMPT)
    visual = torch.zeros(ADAPTER_LEN, HIDDEN, dtype=torch.float64)
    closed = {k: torch.zeros_like(v) if k.endswith("cap_gate") else v for k, v in caption.items()}
    assert not torch.allclose(reference_logits(llama, caption, ids, visual), reference_logits(llama, closed, ids, visual), atol=1e-3)
    gates = [m.cap_gate for m in adapter.adapted]
    assert len(gates) == ADAPTER_LAYERS and all(bool((g != 0).all()) for g in gates)
    layers = adapter.engine.model.model.layers
    assert not hasattr(layers[0].self_attn, "cap_gate")  # the first layer has no adapter


def test_sampling_is_seeded(adapter):
    features = torch.randn(2, TOKENS, adapter.connector.clip_dim)
    official = GenerationOptions(max_new_tokens=STEPS, temperature=0.1, top_p=0.75, seed=1)
    first = adapter.generate(features, ["", ""], "caption", [official] * len(features))
    again = adapter.generate(features, ["", ""], "caption", [official] * len(features))
    assert [a.details["token_ids"] for a in first] == [a.details["token_ids"] for a in again]


def test_comneck_convert_writes_a_folder_that_loads_the_same_model(adapter, files, tiny_models, tmp_path):
    from comneck.cli import main

    out = tmp_path / "converted"
    assert main(["convert", str(files.adapter), "--llama", str(files.llama), "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]
    again = load(tiny_models, out)
    for ours, theirs in ((again.engine.model, adapter.engine.model), (again.connector, adapter.connector)):
        state, reference = ours.state_dict(), theirs.state_dict()
        assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in reference)
    features = torch.randn(2, TOKENS, adapter.connector.clip_dim)
    options = GenerationOptions(max_new_tokens=STEPS)
    assert [a.details for a in again.generate(features, PROMPTS[:2], "caption", [options] * len(features))] == \
        [a.details for a in adapter.generate(features, PROMPTS[:2], "caption", [options] * len(features))]
    assert main(["convert", str(files.adapter), "--llama", str(files.llama), "-o", str(out)]) == 2  # not over a full folder
    sharded = tmp_path / "sharded"
    assert len(write_converted(files.adapter, files.llama, sharded, shard_bytes=20_000)) > 1
    assert load(tiny_models, sharded).engine.model.state_dict().keys() == adapter.engine.model.state_dict().keys()


def test_bad_requests_get_their_own_codes(adapter):
    cases = [
        (("word " * 2100, "caption", GenerationOptions()), "prompt_too_long"),
        (("", "caption", GenerationOptions(max_new_tokens=1024)), None),
    ]
    for args, code in cases:
        if code is None:
            adapter.check_prompt(*args)
            continue
        with pytest.raises(ComneckInputError) as info:
            adapter.check_prompt(*args)
        assert info.value.code == code and "\n" not in str(info.value)


def test_bad_files_are_refused_in_one_line(tiny_models, files, tmp_path, clip_dim):
    def llama_copy(name, change=None):
        target = tmp_path / name
        shutil.copytree(files.llama, target)
        if change is not None:
            state = torch.load(target / "consolidated.00.pth", weights_only=True)
            change(state)
            torch.save(state, target / "consolidated.00.pth")
        return target

    def adapter_copy(name, change):
        state = torch.load(files.adapter, weights_only=True)
        change(state)
        torch.save(state, tmp_path / name)
        return tmp_path / name

    no_w3 = llama_copy("no-w3", lambda s: s.pop("layers.1.feed_forward.w3.weight"))
    wq_shape = llama_copy("wq-shape", lambda s: s.update({"layers.0.attention.wq.weight": s["layers.0.attention.wq.weight"][:, :40]}))
    stray = llama_copy("stray", lambda s: s.update({"layers.0.attention.bias": torch.ones(3)}))
    vocab = llama_copy("vocab")
    train_tokenizer(vocab / "tokenizer.model", vocab_size=400, extra=ADAPTER_CORPUS)
    no_tokenizer = llama_copy("no-tokenizer")
    (no_tokenizer / "tokenizer.model").unlink()
    garbage = llama_copy("garbage")
    (garbage / "params.json").write_text("{dim: 48")
    heads = llama_copy("heads")
    (heads / "params.json").write_text(json.dumps({**META_PARAMS, "n_heads": "4"}))
    sharded = llama_copy("sharded")
    shutil.copy(sharded / "consolidated.00.pth", sharded / "consolidated.01.pth")
    no_gate = adapter_copy("no-gate.pth", lambda s: s.pop("layers.2.attention.cap_gate"))
    qkv = adapter_copy("qkv.pth", lambda s: s.update({"visual_blocks.1.attn.qkv.weight": torch.ones(96, 31)}))
    no_query = adapter_copy("no-query.pth", lambda s: s.pop("cap_adapter_query.weight"))
    rows = adapter_copy("rows.pth", lambda s: s.update({"cap_adapter_query.weight": torch.ones(4 * ADAPTER_LEN, HIDDEN)}))
    unknown = adapter_copy("unknown.pth", lambda s: s.update({"visual_extra.weight": torch.ones(2)}))
    tower = adapter_copy("tower.pth", lambda s: s.update({"clip_proj.weight": torch.ones(32, 768)}))
    cases = [
        (files.adapter, no_w3, "1 weights missing, e.g. 'model.layers.1.mlp.up_proj.weight'"),
        (files.adapter, wq_shape, "layers.0.attention.wq.weight has shape [48, 40]"),
        (files.adapter, stray, "unexpected weight 'layers.0.attention.bias' (not a Meta LLaMA key)"),
        (files.adapter, vocab, "the tokenizer has 400 pieces; tok_embeddings.weight has 420 rows"),
        (files.adapter, no_tokenizer, "no tokenizer.model"),
        (files.adapter, garbage, "params.json is not JSON"),
        (files.adapter, heads, "params.json's n_heads is '4', not a positive integer"),
        (files.adapter, sharded, "2 consolidated.*.pth files: model-parallel shards"),
        (no_gate, files.llama, "no 'layers.2.attention.cap_gate'"),
        (qkv, files.llama, "weight 'visual_blocks.1.attn.qkv.weight' has shape [96, 31], expected [96, 32]"),
        (no_query, files.llama, "no 'cap_adapter_query.weight'"),
        (rows, files.llama, "cap_adapter_query.weight adapts 4 layers; the LLaMA has 3"),
        (unknown, files.llama, "unexpected weight 'visual_extra.weight'"),
        (tower, files.llama, f"clip_proj reads width 768; this gateway's CLIP (tiny-ViT-14) projects to {clip_dim}"),
    ]
    for weights, llama, message in cases:
        with pytest.raises(ComneckInputError) as info:
            load(tiny_models, weights, llama=str(llama))
        assert info.value.code == "bad_weights" and message in str(info.value) and "\n" not in str(info.value), str(info.value)
    with pytest.raises(ComneckInputError) as info:
        load(tiny_models, files.adapter)
    assert info.value.code == "bad_settings" and "llama=LLAMA_DIR" in str(info.value)
    preset = get_preset("tiny-336")  # the registry refuses another CLIP at start-up, before reading anything
    with pytest.raises(ComneckInputError) as info:
        check_backend("llama-adapter-v1", files.adapter, preset.clip, preset.split_block, {"llama": str(files.llama)})
    assert info.value.code == "bad_settings" and "reads ViT-L-14 at 224 px" in str(info.value)


def test_a_caption_request_needs_no_prompt(adapter, tiny_models):
    from comneck_edge import EdgeEncoder

    from comneck.image import sample_photo
    from comneck.pipeline import Pipeline

    pipeline = Pipeline(tiny_models)
    pipeline.add_backend("clip-zero-shot")
    pipeline.backends["llama-adapter-v1"] = adapter
    data = EdgeEncoder(tiny_models.preset).encode_file(sample_photo()).data
    request = pipeline.prepare([data], [""], backend="llama-adapter-v1")
    assert request.task == "caption"
    with pytest.raises(ComneckInputError) as info:  # other tasks still need one
        pipeline.prepare([data], [" "], backend="clip-zero-shot")
    assert info.value.code == "empty_prompt"


def test_http_round_trip_on_the_tiny_preset(files, tiny):
    from comneck_edge import EdgeEncoder, GatewayError
    from comneck_server.demo import local_gateway

    from comneck.image import sample_photo

    data = EdgeEncoder(tiny).encode_file(sample_photo()).data
    with local_gateway("tiny", "--backend", f"llama-adapter-v1={files.adapter},llama={files.llama}") as gateway:
        models = {b["name"]: b for b in gateway.models()["comneck"]["backends"]}
        assert models["llama-adapter-v1"]["resize"] == "paper"
        for fmt in ("msgpack", "multipart"):
            answer = gateway.infer(data, "", options={"max_new_tokens": 4}, fmt=fmt)
            assert answer["backend"] == "llama-adapter-v1" and answer["task"] == "caption" and answer["random_weights"]
            assert answer["details"]["prompt_token_ids"][0] == 1 and len(answer["details"]["token_ids"]) <= 4
        with pytest.raises(GatewayError) as info:
            gateway.infer(data, "", task="vqa")
        assert (info.value.status, info.value.code) == (400, "unsupported_task")
        with pytest.raises(GatewayError) as info:
            gateway.infer(data, "word " * 2100)
        assert (info.value.status, info.value.code) == (422, "prompt_too_long")


def test_a_converted_folder_with_bad_sizes_is_refused(tiny_models, files, tmp_path):
    out = tmp_path / "converted"
    write_converted(files.adapter, files.llama, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "adapter_layers": 5}))
    with pytest.raises(ComneckInputError) as info:
        load(tiny_models, out)
    assert info.value.code == "bad_weights" and "[4, 5, 3] are not positive integers with adapter_layers <= num_hidden_layers" in str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run where one is lent)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_in_each_dtype_matches_the_cpu_and_batches_like_singles(files, tiny_models, adapter, dtype):
    """float32 on CUDA gives the CPU's tokens, and a batch what single calls give; the half types
    rank the CPU's first token in their top 3, with finite log-probabilities."""
    backend = load(tiny_models, files.adapter, llama=str(files.llama), device="cuda", dtype=dtype)
    features = torch.randn(3, TOKENS, adapter.connector.clip_dim, generator=torch.Generator().manual_seed(5))
    options = GenerationOptions(max_new_tokens=STEPS, logprobs=3)
    on_cpu = adapter.generate(features, PROMPTS, "caption", [options] * len(features))
    on_gpu = backend.generate(features.cuda().to(dtype), PROMPTS, "caption", [options] * len(features))
    for cpu, gpu in zip(on_cpu, on_gpu):
        assert cpu.details["logprobs"][0]["token_id"] in [t["token_id"] for t in gpu.details["logprobs"][0]["top_logprobs"]]
        assert all(math.isfinite(t["logprob"]) for step in gpu.details["logprobs"] for t in step["top_logprobs"])
    if dtype == torch.float32:
        assert [a.details["token_ids"] for a in on_gpu] == [a.details["token_ids"] for a in on_cpu]
        singles = [backend.generate(features[i : i + 1].cuda(), PROMPTS[i : i + 1], "caption", [options])[0] for i in range(3)]
        assert [a.details["token_ids"] for a in singles] == [a.details["token_ids"] for a in on_gpu]
