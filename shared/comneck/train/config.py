"""Training configuration: a YAML file, then ``--set key.path=value`` overrides, validated by pydantic.

Defaults are the paper's recipe (DESIGN §1, paper A.1): three stages of 20 epochs,
Adam (0.9, 0.999, eps 1e-8) without weight decay, lr 1e-4 then 1e-5.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from ..presets import RATE_LAMBDAS, get_preset
from ..yaml_config import PresetName, RateIndex, load_yaml_config

Scenario = Literal["d1", "d2", "d3", "postproc"]
#: the words ``amp`` accepts and the mode each means (YAML reads a bare off/on as a boolean)
AMP_WORDS = {"off": "off", "false": "off", "on": "bf16", "true": "bf16", "bf16": "bf16", "fp16": "fp16"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Strict):
    root: Literal["sample"] | Path = Field(description="ImageFolder root: one sub-folder of images per class (ImageNet train layout); "
                                           "sample: the two photos bundled with the package (a smoke run)")
    classes: Path | None = Field(None, description="class names: a .txt (one per line, folder order), a .json {folder: name} "
                                      "or Keras's imagenet_class_index.json {index: [folder, name]}")
    limit: int | None = Field(None, gt=0, description="use only the first N images (smoke tests)")


class StageConfig(_Strict):
    epochs: int = Field(20, ge=0)
    lr: float = Field(gt=0)


class LossConfig(_Strict):
    scale: float = Field(11.52, gt=0, description="overall factor on every loss (the official code's 11.52)")
    ce_weight: float = Field(100.0, ge=0, description="stage 1 (d1, postproc): weight of CE")
    dist_weight: float = Field(100.0, ge=0, description="stages 2-3: weight of L_dist (CE:dist = 1:100)")
    gamma: float = Field(1.0, ge=0, description="d2: weight of MSE(x, x_hat) on the 0..255 scale (1 = the base ELIC's R-D loss at the same lambda)")
    beta: float = Field(1 / 60, ge=0, description="d2: weight of L_dist, in the neck stages' units (scale x dist_weight x MSE); gamma:beta = 60:1")


class TrainConfig(_Strict):
    scenario: Scenario = "d1"
    rate: RateIndex = Field(1, description="rate index 1..4 (lambda 0.004..0.032)")
    preset: PresetName = "tiny"
    data: DataConfig
    stages: list[StageConfig] = Field(
        default_factory=lambda: [StageConfig(lr=1e-4), StageConfig(lr=1e-5), StageConfig(lr=1e-5)],
        min_length=3,
        max_length=3,
    )
    batch_size: int = Field(8, gt=0, description="images per step and process")
    loss: LossConfig = Field(default_factory=LossConfig)
    target: Literal["cls", "tokens"] = Field("cls", description="distil the projected CLS embedding or all tokens at target_block")
    target_block: int = Field(-1, description="tokens target: 1-based CLIP block, negative from the end (-2: Shikra's block 23)")
    codec_weights: Path | None = Field(None, description="the base codec, any file comneck convert reads (an ELIC, or a CompressAI zoo mbt2018-mean for its presets); none: seeded random")
    clip_weights: Path | None = Field(None, description="teacher CLIP (open_clip keys, safetensors); none: seeded random")
    clip_pretrained: str | None = Field(None, description="or an open_clip pretrained tag for the preset's CLIP, e.g. openai")
    neck_weights: Path | None = Field(None, description="start the neck from these weights (e.g. d2/d3 stage i)")
    split_block: int | None = Field(
        None, ge=0, description="CLIP blocks the neck's tokens skip (they enter block split_block + 1; section 4.5's ablation: "
        "1, 2, 4, 8); none: what neck_weights record, else the preset's 2; the export records it")
    clip_final_norm: Literal["once", "twice"] | None = Field(
        None, description="CLIP's final LayerNorm for student and teacher: once (standard CLIP) or twice (the official "
        "code's double ln_post, which the released necks were trained with); none: what neck_weights record, else the "
        "preset's (once); the export records it")
    device: str = "cpu"
    amp: Literal["off", "bf16", "fp16"] = Field("off", description="mixed precision for neck/CLIP/U-Net (on/true mean bf16, false off)")
    workers: int = Field(0, ge=0, description="data-loader worker processes")
    output: Path = Path("runs/train")
    seed: int = 0
    log_every: int = Field(10, gt=0, description="steps between JSONL log lines")
    checkpoint_every: int = Field(500, gt=0, description="steps between checkpoints (and one at every epoch end)")
    keep_checkpoints: int = Field(2, gt=0)
    tensorboard: bool = False

    @field_validator("amp", mode="before")
    @classmethod
    def _amp(cls, amp: Any) -> Any:
        if isinstance(amp, bool):
            return "bf16" if amp else "off"
        if isinstance(amp, str) and amp.lower() in AMP_WORDS:
            return AMP_WORDS[amp.lower()]
        raise ValueError(f"{amp!r} is no mixed-precision mode; use off, bf16 or fp16 (on = bf16)")

    @field_validator("clip_pretrained")
    @classmethod
    def _pretrained_tag(cls, tag: str | None, info: ValidationInfo) -> str | None:
        """Refuse a tag open_clip has no weights for, naming the ones it has (before any slow work)."""
        if tag is None or "preset" not in info.data:
            return tag
        import open_clip

        name = get_preset(info.data["preset"]).clip.name
        tags = open_clip.list_pretrained_tags_by_model(name)
        if not tags:
            raise ValueError(f"preset {info.data['preset']}'s CLIP {name} has no pretrained weights; use preset paper, or clip_weights")
        if tag not in tags:
            raise ValueError(f"{tag!r} is no pretrained tag of {name}; choose one of {', '.join(tags)}")
        return tag

    @property
    def lmbda(self) -> float:
        return RATE_LAMBDAS[self.rate]


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:  # type: ignore[assignment]
    """Read ``path`` (YAML), apply ``key.path=value`` overrides (values parsed as YAML), validate."""
    stages = TrainConfig.model_fields["stages"].default_factory
    return load_yaml_config(TrainConfig, path, overrides, {"stages": lambda: [stage.model_dump() for stage in stages()]})  # type: ignore[misc]
