"""The vLLM engine (``engine=vllm``) against a stand-in vLLM server on loopback.

The stand-in speaks the shape of vLLM's ``POST /v1/completions`` with ``prompt_embeds``
(``vllm/entrypoints/openai/protocol.py`` CompletionRequest; the prompt loaded as
``vllm/entrypoints/renderer.py`` loads it: base64, ``torch.load(weights_only=True)``, 2-D) and
decodes greedily (with a KV cache) by transformers' ``LlamaForCausalLM`` loaded from the folder
``comneck convert --for-vllm`` writes, what vLLM would serve. Like vLLM it keeps the stop token
in its ids, reports ``token_id:N`` tokens with ``return_tokens_as_token_ids`` and adds the
sampled token to ``top_logprobs``. Answers through it must equal the local engine's.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from functools import partial
from types import SimpleNamespace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
import transformers
from checkpoints import load_tiny, write_honeybee, write_llava, write_shikra

from comneck.backends import GenerationOptions, parse_backend_arg
from comneck.backends.engines.vllm import CircuitBreaker, VLLMEngine
from comneck.backends.vllm_export import write_for_vllm
from comneck.errors import ComneckInputError, ErrorCode
from comneck.pipeline import Pipeline

TASKS = {"shikra": "vqa", "honeybee": "vqa", "llava": "vqa"}
PROMPTS = ["What is in the photo?", "Is the cow on the left?"]
OPTIONS = [GenerationOptions(max_new_tokens=4, logprobs=3), GenerationOptions(max_new_tokens=6)]


class StandIn:
    """A loopback server answering ``/v1/completions`` like vLLM, with one model per served name.

    ``mode``: ``ok``, ``slow`` (answers after ``delay_s``), ``garbage`` (200, not JSON) or
    ``error`` (HTTP 500, vLLM's error body). ``token_ids``: also return the choice's ``token_ids``
    (recent vLLM's ``return_token_ids``). ``bodies`` keeps the requests."""

    def __init__(self, models: dict[str, transformers.LlamaForCausalLM]) -> None:
        self.models, self.mode, self.delay_s, self.token_ids, self.bodies = models, "ok", 2.0, False, []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stand_in.bodies.append(body)
                if stand_in.mode == "slow":
                    time.sleep(stand_in.delay_s)
                status, payload = (200, b"<html>not json") if stand_in.mode == "garbage" else stand_in.answer(body)
                self.send_response(status)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                try:
                    self.wfile.write(payload)
                except BrokenPipeError:  # the client gave up waiting (the slow mode)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, body: dict) -> tuple[int, bytes]:
        if self.mode == "error" or body.get("temperature") != 0 or self.path_model(body) is None:
            return 500, json.dumps({"error": {"message": "stand-in refuses", "type": "InternalServerError", "code": 500}}).encode()
        model = self.path_model(body)
        embeds = torch.load(io.BytesIO(base64.b64decode(body["prompt_embeds"], validate=True)), weights_only=True)
        assert embeds.ndim == 2 and embeds.dtype in (torch.float32, torch.float16, torch.bfloat16)
        stops = set(body["stop_token_ids"]) | (set() if body["ignore_eos"] else {model.config.eos_token_id})
        ids, chosen, tops, finish = [], [], [], "length"
        step, cache = embeds[None].float(), None
        with torch.no_grad():
            for _ in range(body["max_tokens"]):
                out = model(inputs_embeds=step, cache=cache, use_cache=True)  # a KV cache, as vLLM decodes
                logp, cache = torch.log_softmax(out.logits[0, -1], -1), out.past_key_values
                token = int(logp.argmax())
                ids.append(token)
                chosen.append(float(logp[token]))
                best = logp.topk(body["logprobs"])
                tops.append({f"token_id:{i}": float(v) for i, v in zip([*best.indices.tolist(), token], [*best.values.tolist(), logp[token]])})
                if token in stops:
                    finish = "stop"
                    break
                step = model.get_input_embeddings().weight[token][None, None]
        choice = {"index": 0, "text": f"<{len(ids)} tokens>", "finish_reason": finish, "stop_reason": ids[-1] if finish == "stop" else None,
                  "logprobs": {"text_offset": list(range(len(ids))), "token_logprobs": chosen, "tokens": [f"token_id:{i}" for i in ids],
                               "top_logprobs": tops}}
        if self.token_ids:
            choice["token_ids"] = ids
        return 200, json.dumps({"id": "cmpl-0", "object": "text_completion", "created": 0, "model": body.get("model"),
                                "choices": [choice], "usage": {"prompt_tokens": len(embeds), "completion_tokens": len(ids)}}).encode()

    def path_model(self, body: dict) -> transformers.LlamaForCausalLM | None:
        return self.models.get(body.get("model"))


def free_port_url() -> str:
    """A loopback URL nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Each backend's tiny checkpoint (weights, options) and its --for-vllm folder."""
    root = tmp_path_factory.mktemp("vllm")
    shikra, honeybee = write_shikra(root / "s"), write_honeybee(root / "h")
    found = {"shikra": (shikra.merged, {}), "honeybee": (honeybee.checkpoint, {"tokenizer": str(honeybee.tokenizer)}),
             "llava": (write_llava(root / "l"), {})}
    exported = {}
    for name, (weights, options) in found.items():
        out = root / f"{name}-for-vllm"
        backend, _ = write_for_vllm(weights, out, tokenizer=honeybee.tokenizer if name == "honeybee" else None)
        assert backend == name
        exported[name] = out
    return found, exported


@pytest.fixture(scope="module")
def stand_in(checkpoints):
    _, exported = checkpoints
    server = StandIn({name: transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
                      for name, out in exported.items()})
    yield server
    server.server.shutdown()


@pytest.fixture(scope="module")
def pairs(checkpoints, stand_in, tiny_models):
    """Each backend loaded twice: on the local engine and on the stand-in."""
    found, _ = checkpoints
    return {name: (load_tiny(name, tiny_models, weights, **options),
                   load_tiny(name, tiny_models, weights, **options, engine="vllm", engine_url=stand_in.url, engine_model=name))
            for name, (weights, options) in found.items()}


@pytest.fixture(autouse=True)
def reset(stand_in):
    stand_in.mode, stand_in.token_ids = "ok", False
    stand_in.bodies.clear()


def features(tiny_models, n: int, seed: int) -> torch.Tensor:
    clip = tiny_models.preset.clip
    return torch.randn(n, clip.grid**2, clip.width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("token_ids", [False, True], ids=["ids-from-logprobs", "ids-field"])
@pytest.mark.parametrize("name", list(TASKS))
def test_answers_through_vllm_equal_the_local_engines(pairs, stand_in, tiny_models, name, token_ids):
    local, remote = pairs[name]
    stand_in.token_ids = token_ids
    sent = []
    generate = local.engine.generate
    local.engine.generate = lambda embeds, *a, **k: sent.extend(embeds) or generate(embeds, *a, **k)
    try:
        x = features(tiny_models, 2, seed=5)
        # the local engine decodes each item alone (left padding in a batch moves logprobs by ~1e-5)
        ours = [local.generate(x[i : i + 1], PROMPTS[i : i + 1], TASKS[name], OPTIONS[i : i + 1])[0] for i in range(2)]
        theirs = remote.generate(x, PROMPTS, TASKS[name], OPTIONS)
    finally:
        del local.engine.generate
    assert remote.engine.input_embeddings.weight.shape == local.engine.input_embeddings.weight.shape
    assert isinstance(remote.engine, VLLMEngine) and remote.engine.model == name  # the embedding table only, no transformer layers
    for a, b in zip(ours, theirs):
        assert b.text == a.text and {k: v for k, v in b.details.items() if k != "logprobs"} == {k: v for k, v in a.details.items() if k != "logprobs"}
        assert (a.details.get("logprobs") is None) == (b.details.get("logprobs") is None)
        for x_, y_ in zip(a.details.get("logprobs") or [], b.details.get("logprobs") or []):
            assert [x_["token_id"], x_["token"], *(t["token_id"] for t in x_["top_logprobs"])] == \
                   [y_["token_id"], y_["token"], *(t["token_id"] for t in y_["top_logprobs"])]
            assert [y_["logprob"], *(t["logprob"] for t in y_["top_logprobs"])] == pytest.approx(
                [x_["logprob"], *(t["logprob"] for t in x_["top_logprobs"])], abs=1e-5)
    assert len(ours[0].details["logprobs"][0]["top_logprobs"]) == 3 and "logprobs" not in ours[1].details
    # what went over the wire: the whole prompt as the local engine gets it, and the options
    assert len(stand_in.bodies) == 2
    for body, embeds, item in zip(sorted(stand_in.bodies, key=lambda b: b["max_tokens"]), sent, OPTIONS):
        got = torch.load(io.BytesIO(base64.b64decode(body["prompt_embeds"])), weights_only=True)
        torch.testing.assert_close(got, embeds, atol=1e-5, rtol=0)  # not equal: the projector ran on a batch of 2, here on 1
        assert got.shape == embeds.shape and body["prompt"] == "" and body["model"] == name
        assert (body["max_tokens"], body["temperature"], body["top_p"], body["logprobs"]) == (
            item.max_new_tokens, 0.0, 1.0, item.logprobs)
        assert body["stop_token_ids"] == [local.tokenizer.eos_token_id] and body["ignore_eos"] is True


def test_a_stop_id_ends_the_answer_as_on_the_local_engine(pairs, tiny_models):
    local, remote = pairs["llava"]
    ids = local.prompt_ids(PROMPTS[0])
    visual = local.projector(features(tiny_models, 1, seed=6))[0]
    embeds = [local.engine.splice(ids, visual, ids.index(local.image_token))]
    options = [GenerationOptions(max_new_tokens=6, logprobs=2)]
    free = local.engine.generate(embeds, options, stop_ids=[0])[0]
    assert free.finish_reason == "length" and len(set(free.token_ids[:3])) == 3
    for stops in ([free.token_ids[2]], [free.token_ids[2], 0]):
        a, b = local.engine.generate(embeds, options, stops)[0], remote.engine.generate(embeds, options, stops)[0]
        assert (b.token_ids, b.text, b.finish_reason) == (a.token_ids, a.text, a.finish_reason) == (free.token_ids[:2], a.text, "stop")
        assert [e["logprob"] for e in b.logprobs] == pytest.approx([e["logprob"] for e in a.logprobs], abs=1e-5)


def engine_at(pairs, url: str, **kwargs) -> VLLMEngine:
    remote = pairs["llava"][1]
    return VLLMEngine(url, remote.engine.input_embeddings, remote.tokenizer, model="llava", **kwargs)


def prompt(engine: VLLMEngine) -> list[torch.Tensor]:
    return [engine.embed([1, 5, 6, 7])]


@pytest.mark.parametrize("mode, why", [("down", "cannot connect"), ("slow", "no answer within the timeout"),
                                       ("garbage", "the answer is not JSON"), ("error", "HTTP 500")])
def test_a_failing_server_is_engine_unavailable_in_one_line(pairs, stand_in, mode, why):
    stand_in.mode, stand_in.delay_s = mode, 1.5
    engine = engine_at(pairs, free_port_url() if mode == "down" else stand_in.url, timeout_s=0.5)
    with pytest.raises(ComneckInputError) as caught:
        engine.generate(prompt(engine), [GenerationOptions(max_new_tokens=2)])
    assert caught.value.code is ErrorCode.ENGINE_UNAVAILABLE and caught.value.code.status == 503
    assert why in str(caught.value) and "\n" not in str(caught.value) and engine.url in str(caught.value)


def test_a_reply_that_is_not_a_completion_is_engine_unavailable(pairs, stand_in, monkeypatch):
    engine = engine_at(pairs, stand_in.url)
    monkeypatch.setattr(stand_in, "answer", lambda body: (200, json.dumps({"choices": [{"text": "hi", "finish_reason": "abort"}]}).encode()))
    with pytest.raises(ComneckInputError, match="not a completion") as caught:
        engine.generate(prompt(engine), [GenerationOptions(max_new_tokens=2)])
    assert caught.value.code is ErrorCode.ENGINE_UNAVAILABLE


def test_the_circuit_breaker_opens_after_n_failures_and_closes_after_the_cool_down(pairs, stand_in, tiny_models):
    now = [100.0]
    engine = engine_at(pairs, stand_in.url, breaker=CircuitBreaker(failures=2, cool_down_s=10.0, clock=lambda: now[0]))
    call = partial(engine.generate, prompt(engine), [GenerationOptions(max_new_tokens=2)])
    stand_in.mode = "error"
    for _ in range(2):
        assert engine.healthy()
        with pytest.raises(ComneckInputError, match="HTTP 500"):
            call()
    assert not engine.healthy() and len(stand_in.bodies) == 2
    readiness = Pipeline(tiny_models)  # what /readyz reports of a backend on this engine
    readiness.backends["llava"] = SimpleNamespace(engine=engine)
    assert readiness.state("llava") == f"loaded; the LLM engine at {stand_in.url} failed 2 times in a row; not tried again for 10.0 s"
    stand_in.mode = "ok"
    now[0] += 9.0
    with pytest.raises(ComneckInputError, match="failed 2 times in a row; not tried again for 1.0 s") as caught:
        call()  # open: refused without a request
    assert caught.value.code is ErrorCode.ENGINE_UNAVAILABLE and len(stand_in.bodies) == 2
    now[0] += 1.0
    assert engine.healthy() and call()[0].token_ids  # cool-down over: tried, and the success closes it
    assert readiness.state("llava") == "loaded"
    stand_in.mode = "error"
    with pytest.raises(ComneckInputError, match="HTTP 500"):
        call()
    assert engine.healthy()  # one failure after a success: the count started again


@pytest.mark.parametrize("name, why", [
    ("v2l", "v2l cannot decode on engine 'vllm': its per-position class-name mask needs a logits processor that vLLM's OpenAI API cannot express"),
    ("llama-adapter-v1", "llama-adapter-v1 cannot decode on engine 'vllm': the image enters inside the attention layers"),
    ("clip-zero-shot", "clip-zero-shot has no language model"),
])
def test_backends_that_cannot_decode_on_vllm_refuse_it_in_one_line(name, why):
    with pytest.raises(ComneckInputError) as caught:
        parse_backend_arg(f"{name}=/w,engine=vllm,engine_url=http://vllm:8000")
    assert why in str(caught.value) and "\n" not in str(caught.value) and caught.value.code is ErrorCode.BAD_SETTINGS


@pytest.mark.parametrize("value, why", [
    ("shikra=/w,engine=vllm", "engine=vllm needs engine_url=http(s)://HOST:PORT"),
    ("shikra=/w,engine=vllm,engine_url=vllm:8000", "needs engine_url"),
    ("shikra=/w,engine_url=http://vllm:8000", "engine_url goes with engine=vllm"),
    ("llava=/w,engine=tgi", "llava cannot decode on engine 'tgi' (engines: hf, vllm)"),
    ("llava=/w,engine=vllm,engine_url=http://vllm:8000,engine_timeout=0", "engine_timeout '0' is not a positive number"),
])
def test_engine_options_are_checked(value, why):
    with pytest.raises(ComneckInputError) as caught:
        parse_backend_arg(value)
    assert why in str(caught.value)


def test_engine_options_reach_the_backend_as_values_not_paths():
    arg = parse_backend_arg("honeybee=/w,tokenizer=/t,engine=vllm,engine_url=http://vllm:8000/,engine_model=hb,engine_timeout=30")
    assert arg.options == {"tokenizer": "/t", "engine": "vllm", "engine_url": "http://vllm:8000/", "engine_model": "hb", "engine_timeout": "30"}


@pytest.mark.parametrize("name", list(TASKS))
def test_the_for_vllm_folder_is_a_plain_llama_with_the_backends_logits(checkpoints, stand_in, pairs, name):
    _, exported = checkpoints
    config = json.loads((exported[name] / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (exported[name] / "tokenizer.model").is_file()
    served, local = stand_in.models[name], pairs[name][0].engine.model
    assert served.config.vocab_size == local.config.vocab_size
    ids = torch.randint(0, local.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(served(ids).logits, local(ids).logits, atol=1e-5, rtol=0)


def test_shikra_for_vllm_from_the_delta_equals_the_merged_without_the_projector(checkpoints, tmp_path):
    from safetensors import safe_open

    (weights, _), exported = checkpoints[0]["shikra"], checkpoints[1]["shikra"]
    folders = weights.parent
    write_for_vllm(folders / "shikra-delta", tmp_path / "from-delta", base=folders / "llama-base")
    with safe_open(str(exported / "model.safetensors"), "pt") as merged, safe_open(str(tmp_path / "from-delta" / "model.safetensors"), "pt") as delta:
        assert set(merged.keys()) == set(delta.keys()) and not any("mm_projector" in k for k in merged.keys())
        assert merged.get_tensor("model.embed_tokens.weight").shape[0] == json.loads((exported / "config.json").read_text())["vocab_size"]
        for key in merged.keys():
            assert torch.equal(merged.get_tensor(key), delta.get_tensor(key)), key


def test_comneck_convert_for_vllm(checkpoints, tmp_path, capsys):
    from comneck.cli import main

    weights = checkpoints[0]["llava"][0]
    assert main(["convert", str(weights), "--for-vllm", "-o", str(tmp_path / "out")]) == 0
    assert "vllm serve" in capsys.readouterr().out and (tmp_path / "out" / "config.json").is_file()
    assert main(["convert", str(weights), "--for-vllm", "--base", str(weights), "-o", str(tmp_path / "again")]) == 2
    assert "--base goes with a Shikra delta folder" in capsys.readouterr().err


def test_the_gateways_backend_setting_keeps_engine_options_on_their_backend():
    from comneck_server.settings import ServerSettings

    settings = ServerSettings(backend="clip-zero-shot,llava=/w,engine=vllm,engine_url=http://vllm:8000,engine_model=llava,shikra=/s,base=/b")
    assert settings.backend_args == ["clip-zero-shot", "llava=/w,engine=vllm,engine_url=http://vllm:8000,engine_model=llava", "shikra=/s,base=/b"]
