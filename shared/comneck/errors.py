"""Errors that are the user's to fix, kept apart from programming errors.

Every refusal carries an :class:`ErrorCode`: its wire name (what the HTTP gateway and the
CLIs' callers see), the HTTP status it answers with, and what it means. Front ends (CLIs,
the HTTP gateway) catch :class:`ComneckInputError` and show its one-line message instead of
a traceback. ``docs/api.md`` lists every code (a test keeps the two in step).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from enum import Enum


class ErrorCode(str, Enum):
    """A machine-readable reason for a refusal, with its HTTP status and meaning."""

    status: int
    meaning: str

    def __new__(cls, value: str, status: int, meaning: str) -> "ErrorCode":
        member = str.__new__(cls, value)
        member._value_ = value
        member.status = status
        member.meaning = meaning
        return member

    def __str__(self) -> str:
        return self.value

    # the container (comneck.bitstream)
    BAD_MAGIC = "bad_magic", 400, "not a ComNeck container (wrong magic bytes)"
    TRUNCATED = "truncated", 400, "the container ends before its header, streams or CRC"
    CORRUPTED = "corrupted", 400, "the container's sizes or stream counts contradict each other"
    CRC_MISMATCH = "crc_mismatch", 400, "the CRC32 does not match: bytes changed on the way"
    UNSUPPORTED_VERSION = "unsupported_version", 400, "a container version this build does not read"
    UNKNOWN_CODEC = "unknown_codec", 400, "a codec id this build does not know"
    BAD_RATE = "bad_rate", 400, "a rate index outside 1..4"
    BAD_SIZE = "bad_size", 400, "an image size of zero or over the configured limit"
    CORRUPT_BITSTREAM = "corrupt_bitstream", 400, "the entropy-coded streams do not hold what the latent grid needs (cut or altered)"
    DECODE_TIMEOUT = "decode_timeout", 422, "entropy decoding took longer than the configured limit"
    CODEC_MISMATCH = "codec_mismatch", 409, "the bitstream was coded by other codec weights than the gateway's"
    UNSUPPORTED_SIZE = "unsupported_size", 422, "a latent grid the loaded neck was not built for"
    # the request
    BAD_REQUEST = "bad_request", 400, "the body or a header cannot be read (not msgpack, bad Content-Length, ...)"
    UNKNOWN_BACKEND = "unknown_backend", 400, "a backend that is not registered, or not loaded on this gateway"
    UNKNOWN_TASK = "unknown_task", 400, "a task name that does not exist"
    UNSUPPORTED_TASK = "unsupported_task", 400, "the backend does not do that task"
    UNAUTHORIZED = "unauthorized", 401, "missing or wrong API key, or a key not sent as Bearer KEY / X-API-Key"
    NOT_FOUND = "not_found", 404, "no such path"
    METHOD_NOT_ALLOWED = "method_not_allowed", 405, "the path does not take that HTTP method"
    BODY_TIMEOUT = "body_timeout", 408, "the body did not arrive in time (configured timeout, or slower than the minimum upload rate)"
    BODY_TOO_LARGE = "body_too_large", 413, "the body is over the configured limit"
    IMAGE_TOO_LARGE = "image_too_large", 413, "the bitstream's image has more pixels than /reconstruct takes (configured limit)"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type", 415, "a content type the endpoint does not take"
    EMPTY_PROMPT = "empty_prompt", 422, "the prompt is empty (only caption and fewshot requests may send none)"
    PROMPT_TOO_LONG = "prompt_too_long", 422, "the prompt is over the configured limit"
    BAD_PROMPT = "bad_prompt", 422, "the backend cannot use this prompt (e.g. fewer than two labels, an empty referring expression)"
    UNKNOWN_TEMPLATE = "unknown_template", 422, "options.template names no prompt template of the backend for that task"
    BAD_CHOICES = "bad_choices", 422, "choices that are not 2 to 26 non-empty strings, or sent to a backend that takes none"
    BAD_SUPPORT = "bad_support", 422, "few-shot support that forms no episode (under 2 classes, labels not one per bitstream, a label too long for the backend, too many examples) or sent to another task"
    UNKNOWN_SUPPORT_SET = "unknown_support_set", 404, "no support set is registered under that name (for that backend)"
    INVALID_REQUEST = "invalid_request", 422, "a field is missing or of the wrong type or range"
    INVALID_INPUT = "invalid_input", 422, "an input the models cannot take (an image, tensor or value out of range)"
    BAD_TAP = "bad_tap", 422, "a CLIP tap names a block the CLIP tail does not have"
    HTTP_ERROR = "http_error", 400, "any other HTTP-level refusal"
    # the gateway's state
    BUSY = "busy", 503, "too many requests in flight: retry after Retry-After seconds"
    NOT_READY = "not_ready", 503, "the models are still loading: retry after Retry-After seconds"
    LOAD_FAILED = "load_failed", 503, "the models failed to load (the message and the log say why)"
    DECODE_UNAVAILABLE = "decode_unavailable", 503, "no decode worker could decode the request (workers stopped from outside, or failing to start): retry after Retry-After seconds"
    DEADLINE_EXCEEDED = "deadline_exceeded", 504, "no answer within the gateway's --request-timeout-s from its admission; its work was dropped if it had not started"
    SUPPORT_STORE_UNAVAILABLE = "support_store_unavailable", 503, "the support-set store (Redis) cannot be reached: support-set requests wait for it, other inference goes on; retry after Retry-After seconds"
    ENGINE_UNAVAILABLE = "engine_unavailable", 503, "the backend's LLM engine (a vLLM server) is down, timed out or answered what is not a completion, or is rested after failing repeatedly: retry later"
    RATE_LIMITED = "rate_limited", 429, "too many requests or connections from one address (the reverse proxy's limits): retry after Retry-After seconds"
    INTERNAL_ERROR = "internal_error", 500, "a bug: the server log has the traceback"
    # set-up: settings, weight files, training configs, outputs (CLIs answer with exit code 2)
    BAD_SETTINGS = "bad_settings", 400, "a gateway setting is wrong (unknown preset, device, weight file)"
    BAD_WEIGHTS = "bad_weights", 422, "a weight file is unreadable, unsafe or does not fit the preset (every bad key listed)"
    BAD_CONFIG = "bad_config", 400, "a training configuration is wrong"
    BAD_DATASET = "bad_dataset", 400, "an evaluation dataset not in its published layout or format (a missing file or image, an annotation file of the wrong structure)"
    BAD_CHECKPOINT = "bad_checkpoint", 422, "a training checkpoint is unreadable, or --resume finds none"
    BAD_OUTPUT = "bad_output", 400, "an output folder that must not be overwritten"
    # the edge client's own (no answer came from a gateway)
    BAD_URL = "bad_url", 400, "the gateway URL is not http(s)"
    UNREACHABLE = "unreachable", 502, "the gateway cannot be reached"
    NOT_A_GATEWAY = "not_a_gateway", 502, "the URL answered, but not as a ComNeck gateway (an HTML page, another API's JSON)"
    TIMEOUT = "timeout", 504, "the gateway did not answer in time"


class ComneckInputError(ValueError):
    """Bad input from a user: a file that is no image, a tensor of the wrong shape, ...

    ``code`` says which mistake (the HTTP gateway sends it, with ``code.status``). A code
    that came over the wire from a newer gateway may be a plain string.
    """

    def __init__(self, message: str, code: ErrorCode | str = ErrorCode.INVALID_INPUT) -> None:
        super().__init__(message)
        self.code = code


def run_command(prog: str, command: Callable[[], str]) -> int:
    """Run a CLI command: print its output and return 0, or print a user error on one line
    of stderr and return exit code 2."""
    try:
        output = command()
    except ComneckInputError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    print(output)
    return 0
