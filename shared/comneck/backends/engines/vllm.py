"""An :class:`~.base.LLMEngine` that decodes on a vLLM server, through its OpenAI-compatible Completions API.

The backend still builds each prompt here, in embedding space (text rows of the LM's input
embedding table, which this engine holds, with the visual tokens spliced in); the whole
sequence, [T, hidden], goes to ``POST {url}/v1/completions`` as ``prompt_embeds``: base64 of
``torch.save(tensor)``, what vLLM's server reads back with ``torch.load(weights_only=True)``
(``vllm/entrypoints/renderer.py``, ``load_prompt_embeds``). The server must run with
``--enable-prompt-embeds`` on the LM alone (``comneck convert --for-vllm``). One request per
item, sent concurrently: vLLM batches them itself.

Each item's :class:`~..base.GenerationOptions` map onto vLLM's sampling parameters (every one
set, so the server's ``generation_config`` defaults never apply): ``max_tokens``,
``temperature``, ``top_p``, no top-k, no repetition penalty, ``seed``; the stop ids as
``stop_token_ids`` with ``ignore_eos`` (only the ids given end an answer, as with the local
engine). Greedy answers equal the local engine's; sampled ones are vLLM's draws (the same seed
gives the same answer on the same server, not the local engine's).

Token ids come from vLLM itself, never from re-tokenising text: the choice's ``token_ids``
where the server returns them (``return_token_ids``, recent vLLM), else its logprobs' tokens,
asked for as ``token_id:N`` strings (``return_tokens_as_token_ids``, with ``logprobs`` always
requested: 0 asks only the sampled token's). The answer is cut at its first stop id (vLLM keeps
the stop token in its ids). The text is those ids decoded here by the backend's tokenizer, as
the local engine decodes them (vLLM's own ``text`` depends on its detokenizer's clean-up of
spaces, which differs between Shikra's and Vicuna's tokenizer settings). Log-probabilities
are vLLM's (its default ``logprobs_mode``: of the raw logits, as the local engine reports them).

Any failure (no connection, a timeout, a non-2xx answer, a body that is not a completion)
becomes ``engine_unavailable``; a connection refused is retried once (nothing reached the
server). After ``failures`` such failures in a row a circuit breaker opens: requests fail at
once for ``cool_down_s``; then they are tried again, and the first success closes it (a failure
opens it for another cool-down).
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import torch
from torch import nn

from ...errors import ComneckInputError, ErrorCode
from ..base import GenerationOptions
from .base import Generation, PromptEmbedder, answer_length, logprob_entries

#: Seconds a completion may take (vLLM answers a long one from a busy server slowly).
DEFAULT_TIMEOUT_S = 120.0
_TOKEN_ID = "token_id:"


class EngineUnavailable(ComneckInputError):
    """vLLM did not give a completion (one line saying why)."""

    def __init__(self, url: str, why: str) -> None:
        super().__init__(f"the LLM engine at {url}: {' '.join(why.split())}", ErrorCode.ENGINE_UNAVAILABLE)


@dataclass
class CircuitBreaker:
    """Fail fast while the engine keeps failing: ``failures`` failures in a row open it for
    ``cool_down_s`` seconds; after that requests are tried again, a success closing it and a
    failure opening it for another cool-down."""

    failures: int = 3
    cool_down_s: float = 10.0
    clock: Callable[[], float] = time.monotonic
    _in_a_row: int = field(default=0, init=False)
    _opened_at: float | None = field(default=None, init=False)

    def is_open(self) -> bool:
        """Requests are refused now (opened, cool-down not over)."""
        return self._opened_at is not None and self.clock() - self._opened_at < self.cool_down_s

    def record(self, ok: bool) -> None:
        """Count one request's outcome."""
        self._in_a_row = 0 if ok else self._in_a_row + 1
        self._opened_at = self.clock() if self._in_a_row >= self.failures else None

    def why_open(self) -> str:
        left = self.cool_down_s - (self.clock() - (self._opened_at or 0.0))
        return f"failed {self._in_a_row} times in a row; not tried again for {left:.1f} s"


def encode_tensor(tensor: torch.Tensor) -> str:
    """base64 of ``torch.save(tensor)`` (dense, contiguous, on the CPU): vLLM's ``prompt_embeds``."""
    buffer = io.BytesIO()
    torch.save(tensor.detach().to("cpu").contiguous(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class VLLMEngine(PromptEmbedder):
    """Decodes prompt embeddings on the vLLM server at ``url`` (``http(s)://host:port``).

    ``embeddings`` is the LM's input embedding table (the backend builds prompts from it),
    ``tokenizer`` the backend's (stops, decoding), ``model`` the served model's name (None: the
    server's only model; older vLLM releases require it). ``client`` replaces the HTTP client
    (tests)."""

    def __init__(self, url: str, embeddings: nn.Embedding, tokenizer: Any, model: str | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, breaker: CircuitBreaker | None = None,
                 client: httpx.Client | None = None) -> None:
        self.url = url.rstrip("/")
        self._embeddings = embeddings.eval()
        self.tokenizer = tokenizer
        self.model = model
        self.breaker = breaker or CircuitBreaker()
        self.client = client or httpx.Client(timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)))
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="vllm-engine")

    @property
    def input_embeddings(self) -> nn.Module:
        return self._embeddings

    def healthy(self) -> bool:
        """False while the circuit breaker is open (for readiness checks; no request is made)."""
        return self.unavailable() is None

    def unavailable(self) -> str | None:
        """Why requests to the engine fail fast now (its circuit breaker is open), or None."""
        return f"the LLM engine at {self.url} {self.breaker.why_open()}" if self.breaker.is_open() else None

    def generate(
        self, embeds: list[torch.Tensor], options: Sequence[GenerationOptions], stop_ids: Sequence[int] = ()
    ) -> list[Generation]:
        """One completion request per item, sent concurrently -> one Generation per item, in order.
        ``stop_ids`` end an answer (none given: the tokenizer's end-of-sequence token)."""
        self.check_prompts(embeds, options)
        if self.breaker.is_open():
            raise EngineUnavailable(self.url, self.breaker.why_open())
        stops = list(stop_ids) or [self.tokenizer.eos_token_id]
        futures = [self._pool.submit(self._complete, e, item, stops) for e, item in zip(embeds, options)]
        return [future.result() for future in futures]

    def request(self, embed: torch.Tensor, options: GenerationOptions, stops: list[int]) -> dict[str, Any]:
        """The Completions request body for one prompt."""
        body: dict[str, Any] = {
            "prompt": "",  # the OpenAI client's required field; the embeddings are the prompt
            "prompt_embeds": encode_tensor(embed.to(self.dtype)),
            "max_tokens": options.max_new_tokens,
            "temperature": options.temperature,
            "top_p": options.top_p,
            "top_k": -1,  # off: options.top_k is a classifier's ranked-answers count, not a sampler
            "repetition_penalty": 1.0,
            "stop_token_ids": stops,
            "ignore_eos": True,  # only ``stops`` end an answer, as with the local engine
            "skip_special_tokens": True,
            "logprobs": options.logprobs,
            "return_tokens_as_token_ids": True,
            "return_token_ids": True,
        }
        if options.seed is not None:
            body["seed"] = options.seed
        if self.model is not None:
            body["model"] = self.model
        return body

    def _complete(self, embed: torch.Tensor, options: GenerationOptions, stops: list[int]) -> Generation:
        try:
            answer = self._generation(self._post(self.request(embed, options, stops)), options, stops)
        except EngineUnavailable:
            self.breaker.record(ok=False)
            raise
        self.breaker.record(ok=True)
        return answer

    def _post(self, body: dict[str, Any]) -> Any:
        """POST the body (a refused connection retried once) -> the decoded JSON."""
        for attempt in (1, 2):
            try:
                response = self.client.post(f"{self.url}/v1/completions", json=body)
                break
            except httpx.ConnectError as exc:  # nothing reached the server: a retry cannot run it twice
                if attempt == 2:
                    raise EngineUnavailable(self.url, f"cannot connect ({exc})") from None
            except httpx.TimeoutException:
                raise EngineUnavailable(self.url, "no answer within the timeout") from None
            except httpx.HTTPError as exc:
                raise EngineUnavailable(self.url, f"{type(exc).__name__}: {exc}") from None
        if not response.is_success:
            raise EngineUnavailable(self.url, f"HTTP {response.status_code}: {response.text[:200]}")
        try:
            return response.json()
        except ValueError:
            raise EngineUnavailable(self.url, f"the answer is not JSON: {response.text[:80]!r}") from None

    def _generation(self, reply: Any, options: GenerationOptions, stops: list[int]) -> Generation:
        """One completion's choice -> a Generation cut at its first stop id."""
        try:
            choice = reply["choices"][0]
            finish = choice["finish_reason"]
            if finish not in ("stop", "length"):
                raise ValueError(f"finish_reason {finish!r}")
            logprobs = choice.get("logprobs")
            ids = _token_ids(choice)
            n = answer_length(ids, stops)
            steps = [[(ids[j], float(logprobs["token_logprobs"][j]), _best(logprobs["top_logprobs"][j], options.logprobs))
                      for j in range(n)]] if options.logprobs else None
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise EngineUnavailable(self.url, f"the answer is not a completion ({type(exc).__name__}: {exc})") from None
        return Generation(
            token_ids=ids[:n],
            text=self.tokenizer.decode(ids[:n], skip_special_tokens=True),
            finish_reason="stop" if n < len(ids) else finish,
            logprobs=logprob_entries(self.tokenizer, steps)[0] if steps is not None else None,
        )


def _token_id(token: str) -> int:
    """``token_id:N`` (``return_tokens_as_token_ids``) -> N."""
    if not token.startswith(_TOKEN_ID):
        raise ValueError(f"token {token!r} is not {_TOKEN_ID}N")
    return int(token[len(_TOKEN_ID):])


def _token_ids(choice: dict[str, Any]) -> list[int]:
    """The generated ids: the choice's ``token_ids`` when the server sends them, else its logprobs' tokens."""
    if choice.get("token_ids") is not None:
        return [int(i) for i in choice["token_ids"]]
    return [_token_id(token) for token in choice["logprobs"]["tokens"]]


def _best(top: dict[str, float], k: int) -> list[tuple[int, float]]:
    """The k most likely of one step's ``top_logprobs`` (vLLM adds the sampled token when it is not among them)."""
    ranked = sorted(((_token_id(token), float(value)) for token, value in top.items()), key=lambda t: -t[1])
    return ranked[:k]
