"""Gateway settings: command-line flags override ``COMNECK_*`` environment variables,
which override the defaults (pydantic-settings does the parsing and the ``--help``)."""

from __future__ import annotations

from argparse import ArgumentParser
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, CliSettingsSource, NoDecode, SettingsConfigDict

from comneck.presets import PRESETS

if TYPE_CHECKING:
    from comneck.models import WeightFiles


class ServerSettings(BaseSettings):
    """Run the ComNeck gateway; each flag is also a COMNECK_* environment variable (flags win)."""

    model_config = SettingsConfigDict(
        env_prefix="COMNECK_",
        cli_prog_name="comneck-server",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_hide_none_type=True,  # --weights PATH, not {Path,null}
        cli_avoid_json=True,
        extra="forbid",
    )

    preset: str = Field(
        "tiny", description=f"model sizes: {', '.join(PRESETS)} (tiny*: demo and tests; paper: ViT-L/14 at 224 px; "
        "*-336: CLIP at 336 px as in LLaVA-1.5, codec input 384x384)"
    )
    weights: Path | None = Field(
        None, description="a weights folder (`comneck convert`, a training export) or a release checkpoint d{1,2,3}_{1..4}.pth.tar: fills the networks not given below"
    )
    codec_weights: Path | None = Field(
        None, description="ELIC weights: our safetensors, a weights folder, a release/ELIC_LLM .pth.tar or a CompressAI state dict"
    )
    neck_weights: Path | None = Field(None, description="transform-neck weights: our safetensors, a weights folder or a release .pth.tar")
    clip_weights: Path | None = Field(
        None, description="CLIP weights: our/open_clip safetensors or .pt (OpenAI TorchScript too), Hugging Face CLIP, a weights folder"
    )
    rate_weights: Annotated[list[Path], NoDecode] = Field(
        [], description="another rate point to serve beside --weights: a weights folder or release checkpoint "
        "d{1,2,3}_{1..4}.pth.tar holding its codec and neck; repeat for more (COMNECK_RATE_WEIGHTS: comma-separated). A "
        "container is decoded by the codec whose fingerprint it carries and goes through that point's neck; CLIP and backends "
        "are shared, so a device may pick its rate (comneck-edge --max-bytes) and one gateway answers it",
    )
    clip_final_norm: Literal["once", "twice"] | None = Field(
        None, description="CLIP's final LayerNorm: once (standard CLIP) or twice (the paper's official code, which trained "
        "the released necks); default: what the weights record (a release checkpoint or its converted folder: twice), "
        "else once",
    )
    device: str = Field("cpu", description="where the neck, CLIP and backends run: cpu, cuda or cuda:N (entropy decoding stays on the CPU)")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="neck/CLIP/backend precision")
    backend: Annotated[list[str], NoDecode] = Field(
        [],
        description="a backend to load, NAME or NAME=WEIGHTS (its published checkpoint), with path options as "
        "NAME=WEIGHTS,KEY=PATH (shikra's delta: shikra=DELTA,base=LLAMA); repeat the flag for more, the first is the "
        "default; default clip-zero-shot (COMNECK_BACKEND takes a comma-separated list)",
    )
    backends: Annotated[list[str], NoDecode] = Field([], description="the older spelling of --backend: names, comma-separated")
    lazy_backends: bool = Field(
        False, description="load each backend on its first request instead of at start-up (its files, packages and CLIP "
        "are still checked at start-up); GET /v1/models and /readyz show each one's state",
    )
    public_docs: bool = Field(
        False, description="with API keys set, serve /, /docs, /redoc and /openapi.json without a key (they describe the "
        "API, no data); without it they need a key like every endpoint but /healthz and /readyz",
    )
    host: str = Field("127.0.0.1", description="interface to listen on (0.0.0.0 in a container)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    api_keys: Annotated[list[str], NoDecode] = Field(
        [],
        description="accepted API keys, comma-separated (prefer the COMNECK_API_KEYS variable); empty: no authentication",
    )
    max_body_bytes: int = Field(8 << 20, gt=0, description="largest request body in bytes (413 beyond)")
    body_timeout_s: float = Field(30.0, gt=0, description="seconds from the request's headers to the end of its body (408 beyond)")
    min_upload_bytes_per_s: int = Field(
        1024, gt=0, description="slowest average upload rate accepted once the grace period is over (408 below)"
    )
    upload_grace_s: float = Field(5.0, ge=0, description="seconds an upload may take before the minimum rate applies")
    max_reconstruct_pixels: int = Field(1024 * 1024, gt=0, description="largest image (height x width) /reconstruct decodes (413 beyond)")
    max_image_side: int = Field(4096, gt=0, description="largest image side a bitstream may declare")
    max_prompt_chars: int = Field(4000, gt=0, description="longest prompt in characters")
    decode_workers: int | None = Field(
        None, ge=0, le=64, description="processes that entropy-decode, in parallel, before a request queues for the models (a crash "
        "in native decoding costs one request); 0: on the model thread, in the gateway process; default: one per core"
    )
    decode_timeout_s: float = Field(30.0, gt=0, description="longest entropy decoding of one bitstream (422 decode_timeout beyond)")
    decode_worker_max_failures: int = Field(
        5, gt=0, description="failed decode-worker starts in a row after which /readyz and requests answer 503 "
        "decode_unavailable (starts go on, 0.1 s doubling to 5 s apart; the first success ends it)"
    )
    max_queue: int = Field(16, gt=0, description="requests admitted at once (queued or running); 503 beyond")
    max_batch: int = Field(8, gt=0, le=256, description="most items the model thread answers in one batch (one neck + CLIP-tail "
                           "pass, one backend call per backend and task); 1: no batching")
    max_wait_ms: float = Field(10.0, ge=0, le=10_000, description="longest a request waits for others to join its batch")
    request_timeout_s: float | None = Field(
        120.0, gt=0, description="longest from a request's admission to its answer: 504 deadline_exceeded beyond, its work dropped "
        "if it had not started")
    keep_alive_timeout_s: int = Field(5, gt=0, description="seconds an idle keep-alive connection stays open after its last answer")
    max_connections: int | None = Field(
        None, gt=0, description="open connections (or running requests) at which uvicorn answers further requests 503 at once; "
        "header-stalling connections count too; unset: no limit",
    )
    max_header_bytes: int = Field(
        16384, ge=1024, description="longest request line and headers in bytes, together (400 beyond; h11's incomplete-event limit)"
    )
    support_store: str = Field(
        "memory", description="where registered support sets live: memory (this process's; a restart forgets them) or a "
        "redis://[:PASSWORD@]HOST:PORT/DB URL (rediss:// with TLS), shared by every gateway replica naming it",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field("info", description="uvicorn log level")

    @field_validator("backend", "backends", "api_keys", "rate_weights", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            return [part.strip() for item in value for part in str(item).split(",") if part.strip()]
        return value

    @field_validator("support_store")
    @classmethod
    def _memory_or_redis(cls, value: str) -> str:
        if value != "memory" and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("give memory or a redis://HOST:PORT/DB URL")
        return value

    @field_validator("backend", "backends", mode="after")
    @classmethod
    def _join_options(cls, parts: list[str]) -> list[str]:
        """Put ``KEY=PATH`` options (``shikra=DELTA,base=LLAMA``) and engine options (``engine=vllm``)
        back onto the backend they follow: a part named for an option of the backend before it continues that backend."""
        if not parts:
            return parts
        from comneck.backends.registry import BACKENDS, ENGINE_OPTIONS  # here: the registry imports torch, which --help need not wait for

        joined: list[str] = []
        for part in parts:
            before = BACKENDS.get(joined[-1].partition("=")[0].strip()) if joined else None
            if before is not None and part.partition("=")[0].strip() in (*before.options, *ENGINE_OPTIONS):
                joined[-1] += "," + part
            else:
                joined.append(part)
        return joined

    @property
    def backend_args(self) -> list[str]:
        """The backends to load, ``NAME``, ``NAME=WEIGHTS`` or ``NAME=WEIGHTS,KEY=PATH``, the default first."""
        return [*self.backend, *self.backends] or ["clip-zero-shot"]

    @property
    def weight_files(self) -> WeightFiles:
        from comneck.models import WeightFiles

        return WeightFiles.bundle(self.weights, self.codec_weights, self.neck_weights, self.clip_weights)

    @property
    def rate_point_files(self) -> list[WeightFiles]:
        """Each further rate point's codec and neck (its CLIP is the main one's)."""
        from comneck.models import WeightFiles

        return [WeightFiles.bundle(path) for path in self.rate_weights]


# --help names each flag's environment variable beside it (flags and variables set the same thing).
for _name, _field in ServerSettings.model_fields.items():
    _field.description = f"{_field.description} [env COMNECK_{_name.upper()}]"

#: pydantic-settings names a flag's value by its Python type (``--port int``, ``--backend list[str]``);
#: --help shows what a user types instead: these, else by type, else the flag's name in capitals.
_METAVARS = {"backend": "NAME[=WEIGHTS]", "backends": "NAMES", "api_keys": "KEYS", "support_store": "memory|URL", "rate_weights": "PATH"}
_TYPE_METAVARS = {"Path": "PATH", "int": "N", "float": "SECONDS"}


def _add_argument(parser: ArgumentParser, *names: str, **kwargs: Any) -> Any:
    metavar = kwargs.get("metavar")
    if metavar and not metavar.startswith("{"):  # {a,b,c} choices stay
        dest = str(kwargs.get("dest", ""))
        kwargs["metavar"] = _METAVARS.get(dest) or _TYPE_METAVARS.get(metavar) or dest.upper()
    return parser.add_argument(*names, **kwargs)


def read_settings(argv: list[str]) -> ServerSettings:
    """Settings from ``argv`` (``--help`` prints and exits), then ``COMNECK_*`` variables, then defaults."""
    source = CliSettingsSource(ServerSettings, add_argument_method=_add_argument)
    return ServerSettings(_cli_settings_source=source(args=argv))
