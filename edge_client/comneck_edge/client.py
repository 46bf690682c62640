"""HTTP client for the ComNeck gateway: send a bitstream and a prompt, get the answer.

Retries on 429 and 503, waiting the server's Retry-After (if any) plus a random share of an
exponential backoff, so that clients refused together come back spread out; every failure is a :class:`GatewayError` with a one-line message and a machine-readable code.
Needs httpx and msgpack (the ``edge`` extra), nothing from the server side.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from typing import Any, Literal

import httpx
import msgpack

from comneck.errors import ComneckInputError, ErrorCode

RETRY_STATUSES = (429, 503)
DEFAULT_RETRIES = 6  # with jitter, enough for 2x --max-queue clients sending back to back (docs/benchmarks.md)
MAX_BACKOFF_S = 30.0
Format = Literal["msgpack", "multipart"]


class GatewayError(ComneckInputError):
    """The gateway could not be reached or refused the request (``status`` 0: no HTTP answer)."""

    def __init__(self, code: ErrorCode | str, message: str, status: int = 0) -> None:
        """``code``: one of ours, or the gateway's code as it came over the wire."""
        super().__init__(message, _known(code))
        self.status = status


def _known(code: ErrorCode | str) -> ErrorCode | str:
    """The code as an :class:`ErrorCode` where this build knows it (a newer gateway may send others)."""
    try:
        return ErrorCode(code)
    except ValueError:
        return code


#: What every /infer answer holds (the report reads them).
ANSWER_KEYS = ("text", "backend", "task", "bytes", "bpp", "timings_ms")


def _foreign(response: httpx.Response, why: str) -> GatewayError:
    """The refusal for an answer no ComNeck gateway gives (a web page, another API)."""
    kind = response.headers.get("content-type", "no content type").split(";")[0]
    return GatewayError(ErrorCode.NOT_A_GATEWAY, f"not a ComNeck gateway: {response.url} answered {response.status_code} ({kind}) "
                                                 f"{why}", response.status_code)


def _decode(response: httpx.Response, keys: tuple[str, ...] = ()) -> Any:
    """The gateway's answer (msgpack or JSON), a map holding ``keys``; anything else is refused
    as not a gateway's."""
    try:
        if response.headers.get("content-type", "").startswith("application/msgpack"):
            body = msgpack.unpackb(response.content, raw=False)
        else:
            body = response.json()
    except (ValueError, msgpack.UnpackException):
        raise _foreign(response, "that is neither JSON nor msgpack") from None
    if not isinstance(body, dict) or any(key not in body for key in keys):
        raise _foreign(response, f"without {', '.join(keys) or 'a JSON object'}")
    return body


def _body(fields: dict[str, Any], structured: dict[str, Any], files: dict[str, list[bytes]], support: list[bytes],
          fmt: Format) -> dict[str, Any]:
    """httpx arguments of a request body: msgpack (one map, bytes as bin) or multipart (text
    fields, the structured ones as JSON, each bitstream a file part; support bitstreams repeated)."""
    fields = {k: v for k, v in fields.items() if v is not None}
    structured = {k: v for k, v in structured.items() if v}
    files = {**files, **({"support_bitstreams": support} if support else {})}
    if fmt == "msgpack":
        body = {**fields, **structured, **{k: v[0] if k == "bitstream" else v for k, v in files.items()}}
        return {"content": msgpack.packb(body, use_bin_type=True), "headers": {"Content-Type": "application/msgpack"}}
    parts = [(name, (f"{name}-{i}.cnk", data, "application/octet-stream")) for name, items in files.items() for i, data in enumerate(items)]
    return {"files": parts, "data": {**fields, **{k: json.dumps(v) for k, v in structured.items()}}}


class GatewayClient:
    """One gateway at ``url``; use as a context manager or call :meth:`close`."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = DEFAULT_RETRIES,
        backoff: float = 0.5,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not timeout > 0:
            raise ComneckInputError(f"the timeout must be a positive number of seconds, got {timeout}")
        if retries < 0:
            raise ComneckInputError(f"retries must be 0 or more, got {retries}")
        self.url = url.rstrip("/")
        self.retries, self.backoff = retries, backoff
        headers = {"Accept": "application/msgpack"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> "GatewayClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _retry_delay(self, response: httpx.Response, attempt: int) -> float:
        """Seconds before retry ``attempt + 1``: never sooner than the server's Retry-After, plus a
        uniform share of ``backoff * 2**attempt`` (jitter: refused together, retried apart)."""
        retry_after = response.headers.get("retry-after", "")
        floor = float(retry_after) if retry_after.isdigit() else 0.0
        return min(floor + random.uniform(0, self.backoff * 2**attempt), MAX_BACKOFF_S)

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request, retried on 429/503; raises :class:`GatewayError` for anything but a 2xx."""
        for attempt in range(self.retries + 1):
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TimeoutException:
                raise GatewayError(ErrorCode.TIMEOUT, f"no answer from {self.url} within {self._http.timeout.read} s") from None
            except (httpx.UnsupportedProtocol, httpx.InvalidURL):
                raise GatewayError(ErrorCode.BAD_URL, f"{self.url} is not an http(s) URL (write http://HOST:PORT)") from None
            except httpx.TransportError as exc:
                reason = str(exc) or type(exc).__name__
                raise GatewayError(ErrorCode.UNREACHABLE, f"cannot reach {self.url}: {reason}") from None
            if response.status_code not in RETRY_STATUSES or attempt == self.retries:
                break
            time.sleep(self._retry_delay(response, attempt))
        if response.is_success:
            return response
        try:
            error = _decode(response, ("error",))["error"]
            code, message = str(error["code"]), str(error["message"])
        except (GatewayError, KeyError, TypeError):
            code, message = ErrorCode.HTTP_ERROR, response.reason_phrase or "no details"
            if response.status_code == 404:  # a ComNeck 404 says not_found; this server does not know the path at all
                message += f": is {self.url} the gateway's base URL (http://HOST:PORT, without /infer)?"
        raise GatewayError(code, f"server answered {response.status_code} {code}: {message}", response.status_code)

    def infer(
        self,
        bitstream: bytes,
        prompt: str,
        task: str | None = None,
        backend: str | None = None,
        options: dict[str, Any] | None = None,
        fmt: Format = "msgpack",
        choices: list[str] | None = None,
        support: list[tuple[bytes, str]] | None = None,
        support_set: str | None = None,
    ) -> dict[str, Any]:
        """POST /infer; returns the response (text, backend, task, bpp, timings_ms, ...).
        ``choices`` make it a multiple-choice question (answered by letter in ``details.choice``);
        task ``fewshot`` takes ``support`` (labelled bitstreams) or a registered ``support_set``."""
        fields = {"prompt": prompt, "task": task, "backend": backend, "support_set": support_set}
        structured = {"options": options, "choices": choices}
        if support:
            structured["support_labels"] = [label for _, label in support]
        return _decode(self._send("POST", "/infer", **_body(fields, structured, {"bitstream": [bitstream]},
                                                          [data for data, _ in support or ()], fmt)), ANSWER_KEYS)

    def register_support_set(self, name: str, support: list[tuple[bytes, str]], backend: str | None = None,
                             fmt: Format = "msgpack") -> dict[str, Any]:
        """PUT /v1/support-sets/{name}: labelled support bitstreams, described once by the gateway."""
        kwargs = _body({"backend": backend}, {"support_labels": [label for _, label in support]}, {}, [data for data, _ in support], fmt)
        return _decode(self._send("PUT", f"/v1/support-sets/{name}", **kwargs), ("name", "classes"))

    def support_sets(self) -> list[dict[str, Any]]:
        """GET /v1/support-sets: name, backend, classes and example count of each registered set."""
        return _decode(self._send("GET", "/v1/support-sets"), ("support_sets",))["support_sets"]

    def delete_support_set(self, name: str) -> dict[str, Any]:
        """DELETE /v1/support-sets/{name}."""
        return _decode(self._send("DELETE", f"/v1/support-sets/{name}"), ("name",))

    def reconstruct(self, bitstream: bytes) -> bytes:
        """POST /reconstruct: PNG bytes of the image g_s reconstructs."""
        response = self._send("POST", "/reconstruct", content=bitstream, headers={"Content-Type": "application/octet-stream"})
        return response.content

    def models(self) -> dict[str, Any]:
        """GET /v1/models: OpenAI's list (``data``: one entry per backend) and, under ``comneck``, the
        codec, rate points, backends and random-weight status."""
        return _decode(self._send("GET", "/v1/models"), ("data",))

    def wait_ready(self, timeout: float = 120.0, poll: float = 0.25, is_alive: Callable[[], bool] = lambda: True) -> None:
        """Poll GET /readyz until the models are loaded, or raise after ``timeout`` seconds
        (or as soon as ``is_alive`` says a server this process started has exited)."""
        deadline = time.monotonic() + timeout
        while True:
            if not is_alive():
                raise GatewayError(ErrorCode.UNREACHABLE, f"the gateway for {self.url} exited before it was ready")
            try:
                response = self._http.get("/readyz")
            except httpx.TransportError:
                response = None
            if response is not None and response.is_success:
                return
            if response is not None and response.status_code == 503:
                error = _decode(response)["error"]
                if error["code"] == ErrorCode.LOAD_FAILED:
                    raise GatewayError(ErrorCode.LOAD_FAILED, f"{self.url}: {error['message']}", 503)
            if time.monotonic() > deadline:
                raise GatewayError(ErrorCode.NOT_READY, f"{self.url} was not ready within {timeout:.0f} s")
            time.sleep(poll)
