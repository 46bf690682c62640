"""An evaluation run's configuration: a YAML file, then ``--set key.path=value`` overrides, validated
by pydantic (``configs/eval/*.yaml`` are ready ones).

A config names the task, the dataset folder and split, the pipelines (one curve each, one weights
folder per rate point for the learned ones, qualities for JPEG / WebP / AVIF), the backend and its
weights, the device and dtype, the batch size, the protocol and the output folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..presets import get_preset, shares_tail
from ..yaml_config import PresetName, RateIndex, load_yaml_config

#: What each eval task asks of the backend: its task name in the registry (``choices``: it must take them).
BACKEND_TASKS: dict[str, str] = {"caption": "caption", "mcq": "vqa", "rec": "rec", "fewshot": "fewshot", "classify": "classify"}
Protocol = Literal["clean", "paper"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetConfig(_Strict):
    root: Path = Field(description="the dataset folder, in its published layout (docs/evaluation.md)")
    options: dict[str, Any] = Field(default_factory=dict, description="the reader's options, e.g. split: test, dataset: refcoco+")
    limit: int | None = Field(None, gt=0, description="only the first N items (smoke runs)")


class RatePointConfig(_Strict):
    rate: RateIndex = Field(description="rate index 1..4 (lambda 0.004..0.032)")
    weights: Path | None = Field(None, description="the weights folder of this rate point (comneck convert, a training export); none: seeded random")


class PipelineConfig(_Strict):
    name: Literal["comneck", "reconstruction", "postproc", "uncompressed", "jpeg", "webp", "avif"]
    label: str | None = Field(None, description="the curve's name in every output (default: name); e.g. comneck-d1")
    points: list[RatePointConfig] = Field(default_factory=list, description="learned pipelines: one weights folder per rate point")
    qualities: list[int] | Literal["auto"] | None = Field(
        None, description="jpeg / webp / avif: the quality sweep; auto: qualities that cover the learned curves' bpp; none: the defaults")
    preset: PresetName | None = Field(
        None, description="learned pipelines: the preset of this curve's weights, when its codec differs from the run's (the codec "
        "ablation: paper-mbt2018-mean beside paper); it must share the run's CLIP and image size. Default: the run's")

    @property
    def curve(self) -> str:
        return self.label or self.name

    @model_validator(mode="after")
    def _points(self) -> "PipelineConfig":
        rates = [p.rate for p in self.points]
        twice = sorted({r for r in rates if rates.count(r) > 1})
        if twice:
            raise ValueError(f"rate point {twice[0]} is listed twice in pipeline {self.curve}")
        if self.qualities is not None and self.name not in ("jpeg", "webp", "avif"):
            raise ValueError(f"qualities apply to jpeg, webp and avif, not {self.name}")
        if self.preset is not None and self.name not in ("comneck", "reconstruction", "postproc"):
            raise ValueError(f"a preset applies to the learned pipelines (comneck, reconstruction, postproc), not {self.name}")
        if isinstance(self.qualities, list) and len(set(self.qualities)) != len(self.qualities):
            raise ValueError(f"a quality is listed twice in pipeline {self.curve}")
        return self


class BackendConfig(_Strict):
    name: str = Field(description="a registered backend (comneck-server --help lists them)")
    weights: Path | None = Field(None, description="its published checkpoint; none: seeded random (tiny) where it has that")
    options: dict[str, str] = Field(default_factory=dict, description="its path options, e.g. tokenizer: PATH")
    prompt: str | None = Field(None, description="caption task: the instruction (default: the backend's own, or LLaVA's COCO prompt)")


class EvalConfig(_Strict):
    task: Literal["caption", "mcq", "rec", "fewshot", "classify", "human"]
    preset: PresetName = "tiny"
    dataset: DatasetConfig
    pipelines: list[PipelineConfig] = Field(min_length=1)
    backend: BackendConfig | None = Field(None, description="the MLLM that answers (every task but human)")
    clip_weights: Path | None = Field(None, description="CLIP weights for the gateway's tail and the full-CLIP baselines")
    device: str = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    batch_size: int = Field(8, gt=0, description="items per Pipeline.answer call")
    max_new_tokens: int | None = Field(None, ge=1, le=1024, description="the longest answer (default: the protocol's: the "
                                       "backend's own, or under paper the official setting)")
    resize: Literal["paper", "pad-square", "pad-square-white", "none", "stretch"] | None = Field(
        None, description="how every pipeline frames the photos (default: the backend's own; human viewing: paper)")
    protocol: Protocol = Field("clean", description="clean: what a served request sees; paper: the official evaluation's choices")
    seed: int = Field(0, description="seeds sampled episodes, the paper protocol's template draws and the gallery")
    output: Path = Path("runs/eval")
    server: str | None = Field(None, description="a running gateway's URL: the comneck pipeline goes through it over HTTP")
    anchor: str | None = Field(None, description="the curve BD-rates are measured against (default: the first JPEG / WebP / AVIF)")
    gallery: int = Field(6, ge=0, description="items the report shows with every pipeline's answer")

    @model_validator(mode="after")
    def _consistent(self) -> "EvalConfig":
        curves = [p.curve for p in self.pipelines]
        twice = sorted({c for c in curves if curves.count(c) > 1})
        if twice:
            raise ValueError(f"pipeline {twice[0]} is listed twice: give each a label")
        if self.task != "human" and self.backend is None:
            raise ValueError(f"task {self.task} needs a backend")
        if self.anchor is not None and self.anchor not in curves:
            raise ValueError(f"anchor {self.anchor!r} is none of the pipelines ({', '.join(curves)})")
        for spec in self.pipelines:
            if spec.preset is not None and not shares_tail(get_preset(spec.preset), get_preset(self.preset)):
                raise ValueError(f"pipeline {spec.curve}'s preset {spec.preset} does not share preset {self.preset}'s CLIP and image size")
        return self

    def curve_preset(self, index: int) -> str:
        """The preset of ``pipelines[index]``'s weights: its own, else the run's."""
        return self.pipelines[index].preset or self.preset


def load_eval_config(path: str | Path | None, overrides: list[str] = ()) -> EvalConfig:  # type: ignore[assignment]
    """Read ``path`` (YAML), apply ``key.path=value`` overrides, validate (one line naming the key)."""
    return load_yaml_config(EvalConfig, path, overrides)


